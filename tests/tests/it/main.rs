//! Repository-level tests, one binary: the Helm chart rendered by the real Helm SDK
//! (`chart`), the generated CRDs (`crds`), the Dockerfile (`dockerfile`) and the example
//! manifests (`examples`).

mod architecture;
mod chart;
mod crds;
mod dockerfile;
mod examples;
mod flags;
