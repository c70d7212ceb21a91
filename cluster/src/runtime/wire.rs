//! Wire messages between the coordinator and a remote worker, sent as codec frames on the
//! connection's control stream ([`crate::transport::Peer::send`] / [`crate::transport::Peer::recv`]),
//! each size-checked against `max_frame_len` before it is decoded.
//!
//! Append variants only, never reorder them: bincode numbers enum variants by position. A change
//! to an existing variant's fields changes the format: bump
//! [`PROTOCOL_VERSION`](crate::transport::PROTOCOL_VERSION) with it, so a process of another build
//! is refused at the handshake instead of failing to decode (version 2 added the round numbers,
//! version 3 made an assignment a list of items).
//!
//! Rounds: every item of a job belongs to one round ([`super::Job::round`]), numbered from 1. An
//! assignment carries its round and the worker echoes it in the result, so a late result of an
//! earlier round (a failed round's items still running, a duplicate) can never be taken for the
//! item of the same index in the current round: the coordinator drops it.

use serde::{Deserialize, Serialize};

/// One control message of the runtime's protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Wire {
    /// Coordinator → worker: run these items of round `round`, in this order: each an index in
    /// the round's item list and its caller-encoded payload. One message carries what one
    /// dispatch hands the worker, so a batching executor sees them together.
    Assign {
        /// The round the items belong to (from 1).
        round: u64,
        /// `(index within the round, payload)` per item.
        items: Vec<(u64, Vec<u8>)>,
    },
    /// Worker → coordinator: the outcome of an assigned item.
    Result {
        /// The round, as in [`Wire::Assign`].
        round: u64,
        /// The item's index, as in [`Wire::Assign`].
        item: u64,
        /// The executor's output, or its error in words.
        result: Result<Vec<u8>, String>,
    },
    /// Either direction: "I am alive", every heartbeat interval.
    Heartbeat,
    /// Coordinator → worker: the job is over; exit normally.
    Done,
    /// Coordinator → worker: the job failed (`reason`); exit with an error.
    Abort {
        /// Why the job failed, in words.
        reason: String,
    },
    /// Coordinator → worker: round `round` is over (it failed): drop the queued items of that
    /// round and earlier ones without running them. The running item, if any, still finishes,
    /// and its result is dropped by the coordinator.
    Cancel {
        /// The last round whose queued items are dropped.
        round: u64,
    },
    /// Coordinator → worker: a state blob for the executor
    /// ([`Executor::on_broadcast`](super::Executor::on_broadcast)), applied after the items
    /// assigned before it and before those assigned after it.
    Broadcast {
        /// The caller-encoded state.
        state: Vec<u8>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn every_variant_round_trips() {
        let msgs = [
            Wire::Assign { round: 3, items: vec![(7, vec![1, 2, 3]), (9, vec![])] },
            Wire::Result { round: 3, item: 7, result: Ok(vec![9; 100]) },
            Wire::Result { round: 1, item: 8, result: Err("out of memory".into()) },
            Wire::Heartbeat,
            Wire::Done,
            Wire::Abort { reason: "item 3 failed".into() },
            Wire::Cancel { round: 2 },
            Wire::Broadcast { state: vec![5; 40] },
        ];
        for msg in msgs {
            let bytes = codec::encode(&msg).expect("encodes");
            assert_eq!(codec::decode::<Wire>(&bytes).expect("decodes"), msg);
        }
    }
}
