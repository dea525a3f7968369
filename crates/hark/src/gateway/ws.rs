//! WebSocket endpoints (placeholder while it is written).
use axum::extract::State;
use crate::server::App;
pub async fn visitor_upgrade(State(_app): State<App>) -> &'static str { "" }
pub async fn agent_upgrade(State(_app): State<App>) -> &'static str { "" }
