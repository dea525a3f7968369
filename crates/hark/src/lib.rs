//! Hark: self-hosted live chat for websites.
//!
//! Layout, from the edge inwards (see `ARCHITECTURE.md`):
//!
//! - [`gateway`]: HTTP, WebSocket and REST edge; the only place that speaks the wire formats.
//! - [`delivery`]: group commit, local fan-out (hub) and per-connection sequencing.
//! - [`bus`]: events between nodes (a hint; the store is the truth).
//! - [`store`]: the system of record behind the `Store` trait (SQLite now, PostgreSQL next).
//! - [`domain`], [`auth`], [`config`], [`rate`]: types, credentials, settings, token buckets.
//! - [`server`]: wiring and lifecycle (build, serve, drain).
//! - [`admin`]: the `hark admin …` operations, against the same store as the server.

pub mod admin;
pub mod auth;
pub mod bus;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod gateway;
pub mod presence;
pub mod rate;
pub mod server;
pub mod store;

pub use config::Config;
pub use server::{Server, StartError};
