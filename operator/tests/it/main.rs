//! The operator's integration tests, one binary: the reconciler against a fake API
//! (`controller`), the real operator binary against the emulated Kubernetes API
//! (`tollgate-kube-emulator`) with real gateways and Redis (`e2e`, `faults`, `tenancy`), and
//! the chart's rendering (`render`).

mod common;

mod controller;
mod e2e;
mod faults;
mod render;
mod tenancy;
