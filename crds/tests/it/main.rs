//! The API crate's integration tests, one binary: the committed CRDs against the types
//! (`crd_drift`), manifest loading (`manifests`) and configuration parts (`parts`).

mod crd_drift;
mod manifests;
mod parts;
