//! The edge: HTTP routes, the WebSocket endpoints and the REST API. Only this module (with
//! `hark-protocol`) knows the wire formats; it parses what arrives into domain types and hands it
//! to the services, and maps every failure to one error shape with a stable code.

pub mod api;
pub mod error;
pub mod openapi;
pub mod ops;
pub mod presence_api;
pub mod session;
pub mod ws;

use axum::routing::get;
use axum::Router;
use tower_http::trace::TraceLayer;

use crate::server::App;

pub fn router(app: App) -> Router {
    Router::new()
        .route("/ws/visitor", get(ws::visitor_upgrade))
        .route("/ws/agent", get(ws::agent_upgrade))
        .merge(ops::routes())
        .merge(api::routes())
        .layer(TraceLayer::new_for_http())
        .with_state(app)
}
