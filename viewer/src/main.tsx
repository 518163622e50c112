import "./style.css";
import { render } from "preact";
import { useState } from "preact/hooks";
import { errorSentence, gql } from "./api";
import { AnnotationPage, SearchPage } from "./pages-browse";
import { GroupPage } from "./pages-group";
import { UploadPage } from "./pages-upload";
import { type Me, clearSession, loadMe, loadToken, saveSession } from "./session";
import { BASE, ErrorMessage, Link, PageTitle, useLocation } from "./ui";

function SignIn(props: { onSignedIn: (me: Me) => void }) {
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  return (
    <main class="sign-in">
      <PageTitle>Sign in</PageTitle>
      <form
        onSubmit={async (event) => {
          event.preventDefault();
          const token = String(new FormData(event.currentTarget).get("token") ?? "").trim();
          setBusy(true);
          try {
            const { me } = await gql<{ me: Me }>("query Me { me { user role } }", {}, token);
            saveSession(token, me);
            props.onSignedIn(me);
          } catch (failure) {
            setError(errorSentence(failure));
          } finally {
            setBusy(false);
          }
        }}
      >
        <div class="field">
          <label for="token">API token</label>
          <input id="token" name="token" type="password" autocomplete="off" required spellcheck={false} />
        </div>
        <p class="hint">The token stays in this tab only; closing the tab forgets it.</p>
        <button type="submit" disabled={busy}>
          Sign in
        </button>
        <ErrorMessage error={error} />
      </form>
    </main>
  );
}

function Page() {
  const location = useLocation();
  const path = location.pathname.replace(/\/+$/, "");
  let match: RegExpMatchArray | null;
  if ((match = path.match(/^\/viewer\/annotations\/(\d+)\/upload$/))) return <UploadPage key={path} annotationId={match[1]} />;
  if ((match = path.match(/^\/viewer\/annotations\/(\d+)$/))) return <AnnotationPage key={path} id={match[1]} />;
  if ((match = path.match(/^\/viewer\/groups\/(\d+)$/))) return <GroupPage key={path} id={match[1]} />;
  if (path === "/viewer" || path === "") return <SearchPage key={location.search} />;
  return (
    <main>
      <PageTitle>Page not found</PageTitle>
      <p>
        There is no such page. <Link href={`${BASE}/`}>Search annotations</Link>
      </p>
    </main>
  );
}

function App() {
  const [me, setMe] = useState<Me | null>(() => (loadToken() ? loadMe() : null));
  return (
    <>
      <a class="skip" href="#content">
        Skip to content
      </a>
      <header>
        <Link class="brand" href={`${BASE}/`}>
          pacs-masks
        </Link>
        <nav aria-label="Main">
          <Link href={`${BASE}/`}>Annotations</Link>
          <a href="/graphql">GraphiQL</a>
        </nav>
        {me && (
          <div class="who">
            <span data-testid="me">
              Signed in as <strong>{me.user}</strong> ({me.role})
            </span>
            <button
              type="button"
              onClick={() => {
                clearSession();
                setMe(null);
              }}
            >
              Sign out
            </button>
          </div>
        )}
      </header>
      <div id="content">{me ? <Page /> : <SignIn onSignedIn={setMe} />}</div>
    </>
  );
}

render(<App />, document.getElementById("app")!);
