//! The `tollgate.dev/v1alpha1` API.

mod api_key;
mod common;
mod guardrails;
mod provider;
mod route_policy;

pub use api_key::*;
pub use common::*;
pub use guardrails::*;
pub use provider::*;
pub use route_policy::*;

/// API group of every Tollgate kind.
pub const GROUP: &str = "tollgate.dev";
/// API version served and stored.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every Tollgate object.
pub const API_VERSION: &str = "tollgate.dev/v1alpha1";
