//! The bus carries events between nodes. It is a hint, never the truth: it may drop or delay, and
//! receivers repair gaps from the store (`delivery::sequencer`). One node needs no bus, so
//! [`LocalBus`] hands events straight to this node's hub; the cluster's NATS bus publishes them
//! on per-site subjects and hands what it receives to the hub of every node.

use crate::delivery::event::Event;
use crate::delivery::hub::Hub;

pub trait Bus: Send + Sync + 'static {
    /// Publishes an event to every node (this one included). Never blocks.
    fn publish(&self, event: Event);
    /// Whether the bus is connected, for `/readyz`.
    fn is_ready(&self) -> bool;
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
