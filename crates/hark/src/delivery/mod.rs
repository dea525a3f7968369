//! Delivery services: what happens to a message between the edge and the store and back out.
//!
//! - [`committer`]: group commit. Sends from every connection queue here (bounded), are written
//!   many per transaction, and are acknowledged only after the commit.
//! - [`hub`]: this node's registry of live connections, by site and by visitor, and the fan-out of
//!   events to their bounded outbound queues (a full queue cuts the connection loose).
//! - [`sequencer`]: per-connection bookkeeping that turns an unreliable event stream (the bus is a
//!   hint) into exactly-once, in-order, gap-free delivery by backfilling from the store.
//! - [`event`]: the events that travel from committer through the bus to the hub.

pub mod committer;
pub mod event;
pub mod hub;
pub mod outbox;
pub mod sequencer;
