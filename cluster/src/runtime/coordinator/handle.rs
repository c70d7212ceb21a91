//! How the coordinator reaches one worker: the worker actor of a local executor, or the peer
//! actor of a remote worker's connection.

use std::sync::Arc;

use ractor::{ActorCell, ActorRef};

use super::super::{peer::PeerMsg, wire::Wire, worker::WorkerMsg};

/// How the coordinator reaches one worker.
pub(super) enum Handle {
    Local(ActorRef<WorkerMsg>),
    Remote(ActorRef<PeerMsg>),
}

impl Handle {
    pub(super) fn assign(&self, round: u64, items: Vec<(u64, Vec<u8>)>) -> bool {
        match self {
            Handle::Local(w) => w.send_message(WorkerMsg::Assign { round, items }).is_ok(),
            Handle::Remote(p) => p.send_message(PeerMsg::Assign { round, items }).is_ok(),
        }
    }

    pub(super) fn cancel(&self, round: u64) {
        let _ = match self {
            Handle::Local(w) => w.send_message(WorkerMsg::Cancel { round }).is_ok(),
            Handle::Remote(p) => p.send_message(PeerMsg::Cancel { round }).is_ok(),
        };
    }

    pub(super) fn broadcast(&self, blob: &Arc<Vec<u8>>) {
        let _ = match self {
            Handle::Local(w) => w.send_message(WorkerMsg::Broadcast(blob.clone())).is_ok(),
            Handle::Remote(p) => p.send_message(PeerMsg::Broadcast(blob.clone())).is_ok(),
        };
    }

    pub(super) fn finish(&self, last: Wire) {
        let _ = match self {
            Handle::Local(w) => w.send_message(WorkerMsg::Done).is_ok(),
            Handle::Remote(p) => p.send_message(PeerMsg::Finish(last)).is_ok(),
        };
    }

    pub(super) fn cell(&self) -> ActorCell {
        match self {
            Handle::Local(w) => w.get_cell(),
            Handle::Remote(p) => p.get_cell(),
        }
    }
}
