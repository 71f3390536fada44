package controllers

// ConflictPaths exposes conflictPaths to the envtest suite, which checks it
// against the API server's own conflict errors.
var ConflictPaths = conflictPaths
