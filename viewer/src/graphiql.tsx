/** @jsxImportSource react */
// GraphiQL served from this server's own files: a hospital network has no CDN.
import "graphiql/style.css";
import "./graphiql-page.css";
import { createGraphiQLFetcher } from "@graphiql/toolkit";
import { GraphiQL } from "graphiql";
import { createRoot } from "react-dom/client";
import { loadToken } from "./session";

// The viewer's token of this tab, if it opened GraphiQL: it stays in the tab (sessionStorage).
const token = loadToken();
const origin = window.location.origin;
// The fetcher carries the token too: GraphiQL introspects before its header editor exists.
const fetcher = createGraphiQLFetcher({
  url: `${origin}/graphql`,
  subscriptionUrl: `${origin.replace(/^http/, "ws")}/graphql`,
  headers: token ? { Authorization: `Bearer ${token}` } : {},
  wsConnectionParams: token ? { Authorization: `Bearer ${token}` } : {},
});
const headers = JSON.stringify({ Authorization: `Bearer ${token ?? "<API token>"}` }, null, 2);

const DEFAULT_QUERY = `# Ctrl-Enter runs the query; the Docs panel lists the schema.
query Me {
  me { user role }
  annotations(limit: 5) { id studyInstanceUid maskGroups { id status uploadedSliceCount sliceCount } }
}
`;

createRoot(document.getElementById("graphiql")!).render(
  <GraphiQL fetcher={fetcher} headers={headers} defaultQuery={DEFAULT_QUERY} defaultEditorToolsVisibility="headers" />,
);
