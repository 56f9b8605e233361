//! `tollgate-operator`: reconciles Provider, RoutePolicy and ApiKey resources into the
//! ConfigMap and Secrets gateways mount, and offers the same compile offline.
#![forbid(unsafe_code)]

pub mod controller;
pub mod desired;
pub mod keys;
pub mod leader;
pub mod metrics;
pub mod publish;
pub mod render;
pub mod run;
pub mod settings;
pub mod status;
pub mod usage;
