//! The bus carries events between nodes. It is a hint, never the truth: it may drop or delay, and
//! receivers repair gaps from the store (`delivery::sequencer`). One node needs no bus, so
//! [`LocalBus`] hands events straight to this node's hub; the cluster's NATS bus publishes them
//! on per-site subjects and hands what it receives to the hub of every node.

pub mod nats;
mod wire;

pub use nats::NatsBus;

use crate::delivery::event::Event;
use crate::delivery::hub::Hub;

pub trait Bus: Send + Sync + 'static {
    /// Publishes an event to every node (this one included). Never blocks.
    fn publish(&self, event: Event);
    /// Whether the bus is connected, for `/readyz`.
    fn is_ready(&self) -> bool;
    /// Events may have been lost since `since_ms` (wall clock) in a way the bus cannot see, for
    /// example a peer node that died with events still queued: this node's connections catch up
    /// from the store on every conversation updated since then. Nothing is lost in-process, so
    /// by default this does nothing.
    fn catch_up_since(&self, _since_ms: i64) {}
}

/// The single-node bus: events go to this node's hub, synchronously and in order.
pub struct LocalBus {
    hub: Hub,
}

impl LocalBus {
    pub fn new(hub: Hub) -> LocalBus {
        LocalBus { hub }
    }
}

impl Bus for LocalBus {
    fn publish(&self, event: Event) {
        self.hub.dispatch(&event);
    }
    fn is_ready(&self) -> bool {
        true
    }
}
