//! REST API (placeholder while it is written).
use axum::Router;
use crate::server::App;
pub fn routes() -> Router<App> {
    Router::new()
}
