"""GraphQL documents the tests send, written against the public contract."""

CREATE_ANNOTATION = """
mutation($input: CreateAnnotationInput!) {
  createAnnotation(input: $input) { id studyInstanceUid seriesInstanceUid label createdBy createdAt }
}"""

CREATE_GROUP = """
mutation($input: CreateMaskGroupInput!) {
  createMaskGroup(input: $input) {
    id annotationId sliceCount maskType modelName status uploadedSliceCount totalBytes
    missingSliceIndexes
  }
}"""

REQUEST_URLS = """
mutation($groupId: ID!, $slices: [SliceUploadInput!]!, $ttl: Int) {
  requestMaskUploadUrls(groupId: $groupId, slices: $slices, ttlSeconds: $ttl) {
    sliceIndex labelName filePath url method headers { name value } expiresAt
  }
}"""

COMPLETE = """
mutation($groupId: ID!, $slices: [CompletedSliceInput!]!) {
  completeMaskUpload(groupId: $groupId, slices: $slices) {
    maskGroup { id status uploadedSliceCount missingSliceIndexes totalBytes }
    masks { id sliceIndex labelName filePath fileSize checksum mimeType width height
            sopInstanceUid viewUrl }
  }
}"""

DELETE_GROUP = """
mutation($id: ID!) {
  deleteMaskGroup(id: $id) { id deletedMaskCount deletedObjectCount storageCleanupPending }
}"""

TREE = """
query($id: ID!) {
  annotation(id: $id) {
    id studyInstanceUid
    maskGroups {
      id sliceCount status uploadedSliceCount totalBytes missingSliceIndexes
      annotation { id }
      masks { id sliceIndex labelName filePath fileSize checksum mimeType viewUrl }
    }
  }
}"""
