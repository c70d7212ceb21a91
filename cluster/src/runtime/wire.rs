//! Wire messages between the coordinator and a remote worker, sent as codec frames on the
//! connection's control stream ([`crate::transport::Peer::send`] / [`crate::transport::Peer::recv`]).
//!
//! Append variants only, never reorder them: bincode numbers enum variants by position.

use serde::{Deserialize, Serialize};

/// One control message of the runtime's protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Wire {
    /// Coordinator → worker: run item `item` (its index in the run's item list) on `payload`.
    Assign {
        /// The item's index.
        item: u64,
        /// The caller-encoded work item.
        payload: Vec<u8>,
    },
    /// Worker → coordinator: the outcome of an assigned item.
    Result {
        /// The item's index, as in [`Wire::Assign`].
        item: u64,
        /// The executor's output, or its error in words.
        result: Result<Vec<u8>, String>,
    },
    /// Either direction: "I am alive", every heartbeat interval.
    Heartbeat,
    /// Coordinator → worker: every item has a result; exit normally.
    Done,
    /// Coordinator → worker: the run failed (`reason`); exit with an error.
    Abort {
        /// Why the run failed, in words.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn every_variant_round_trips() {
        let msgs = [
            Wire::Assign { item: 7, payload: vec![1, 2, 3] },
            Wire::Result { item: 7, result: Ok(vec![9; 100]) },
            Wire::Result { item: 8, result: Err("out of memory".into()) },
            Wire::Heartbeat,
            Wire::Done,
            Wire::Abort { reason: "item 3 failed".into() },
        ];
        for msg in msgs {
            let bytes = codec::encode(&msg).expect("encodes");
            assert_eq!(codec::decode::<Wire>(&bytes).expect("decodes"), msg);
        }
    }
}
