//! One round of a job, as a pure state machine (no actors, no clock: the caller passes `now`):
//! the round's [`Scheduler`], who computed what, who was lost, and the round-number check that
//! keeps a late result of an earlier round out of this one.
//!
//! Items are numbered from 0 in every round, so item 3 of round 1 and item 3 of round 2 share an
//! index; only the round number, which travels with every assignment and result
//! ([`super::wire::Wire`]), tells them apart. [`Round::receive`] drops a result of another round
//! before the scheduler sees it.

use std::time::Instant;

use super::{ClusterError, LostWorker, RoundResults, RoundSummary};
use crate::{
    membership::MemberKey,
    scheduler::{Completion, ItemId, Progress, Scheduler, SchedulerError},
};

/// What [`Round::receive`] did with a result.
#[derive(Debug)]
pub(crate) enum Received {
    /// Stored as the item's result.
    Stored,
    /// The item already had a result (another worker's, or this one's again): dropped.
    AlreadyDone,
    /// The result belongs to another round: dropped.
    Stale,
    /// This round has no item of that index: dropped.
    Unknown,
    /// The executor failed on the item: the round fails with this error.
    Failed(ClusterError),
}

/// The state of one running round.
#[derive(Debug)]
pub(crate) struct Round {
    number: u64,
    scheduler: Scheduler<Vec<u8>, Vec<u8>, MemberKey>,
    executed: Vec<u32>,
    /// Every worker live at some time during the round, in joining order, with the items it
    /// completed in this round.
    per_worker: Vec<(MemberKey, String, usize)>,
    lost: Vec<LostWorker>,
    stale: usize,
    started: Instant,
    /// With no worker live, the wait for one counts from here at the earliest.
    wait_from: Instant,
    /// For a pinned round ([`super::Job::round_pinned`]): the one worker (by name) each item
    /// may go to.
    owners: Option<Vec<String>>,
}

impl Round {
    /// Round `number` over `items` (one result each, in this order), with `limit` items in
    /// flight per worker, started at `now`.
    pub(crate) fn new(
        number: u64,
        items: Vec<Vec<u8>>,
        limit: usize,
        now: Instant,
        wait_from: Instant,
    ) -> Result<Self, SchedulerError> {
        let executed = vec![0; items.len()];
        Ok(Self {
            number,
            scheduler: Scheduler::new(items).with_in_flight_limit(limit)?,
            executed,
            per_worker: Vec::new(),
            lost: Vec::new(),
            stale: 0,
            started: now,
            wait_from,
            owners: None,
        })
    }

    /// Pins item `i` to the worker named `owners[i]`: no other worker gets it, and the round
    /// fails if that worker is lost before the item is done ([`Round::pinned_loss`]).
    pub(crate) fn pinned(mut self, owners: Vec<String>) -> Self {
        self.owners = Some(owners);
        self
    }

    /// The first owner of a pinned round that is not among `live` (names), if any.
    pub(crate) fn missing_owner<'a>(&'a self, live: &[String]) -> Option<&'a str> {
        self.owners.as_ref()?.iter().find(|o| !live.contains(o)).map(String::as_str)
    }

    /// For a pinned round: the error that fails it because `key` was lost with an item that
    /// only it may compute still undone; `None` otherwise. Call after [`Round::worker_lost`].
    pub(crate) fn pinned_loss(&self, key: &MemberKey) -> Option<ClusterError> {
        let owners = self.owners.as_ref()?;
        let name = self.name_of(*key);
        let done = self.executed.iter().map(|&n| n > 0);
        let items: Vec<usize> = owners
            .iter()
            .zip(done)
            .enumerate()
            .filter(|(_, (o, done))| **o == name && !done)
            .map(|(i, _)| i)
            .collect();
        (!items.is_empty()).then(|| ClusterError::PinnedWorkerLost {
            worker: name,
            round: self.number,
            items,
        })
    }

    pub(crate) fn number(&self) -> u64 {
        self.number
    }

    pub(crate) fn wait_from(&self) -> Instant {
        self.wait_from
    }

    /// `key` (named `name`) is live during this round: it may get items.
    pub(crate) fn joined(&mut self, key: MemberKey, name: &str) {
        if !self.per_worker.iter().any(|(k, _, _)| *k == key) {
            self.per_worker.push((key, name.to_string(), 0));
        }
    }

    fn name_of(&self, key: MemberKey) -> String {
        self.per_worker
            .iter()
            .find(|(k, _, _)| *k == key)
            .map_or_else(|| format!("{key:?}"), |(_, name, _)| name.clone())
    }

    /// The next item for `key`, as (index, payload), or `None` when it holds its limit or
    /// nothing is queued.
    pub(crate) fn next_for(&mut self, key: &MemberKey, now: Instant) -> Option<(u64, Vec<u8>)> {
        let owners = self.owners.as_ref();
        let name = owners.map(|_| self.name_of(*key));
        let allowed = |id: ItemId| match (owners, &name) {
            (Some(owners), Some(name)) => owners.get(id.0) == Some(name),
            _ => true,
        };
        self.scheduler.next_for_where(key, now, allowed).map(|a| (a.id.0 as u64, a.payload.clone()))
    }

    /// A worker's result for item `item` of round `round`. A result of another round is
    /// [`Received::Stale`] and touches nothing; so is every result once the round failed.
    pub(crate) fn receive(
        &mut self,
        key: MemberKey,
        round: u64,
        item: u64,
        result: Result<Vec<u8>, String>,
    ) -> Received {
        if round != self.number {
            self.stale += 1;
            return Received::Stale;
        }
        let Some(idx) = usize::try_from(item).ok().filter(|&i| i < self.executed.len()) else {
            return Received::Unknown;
        };
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(error) => {
                let worker = self.name_of(key);
                return Received::Failed(ClusterError::ItemFailed { item: idx, worker, error });
            }
        };
        self.executed[idx] += 1;
        match self.scheduler.complete(&key, ItemId(idx), bytes) {
            Ok(Completion::Accepted { .. }) => {
                if let Some(entry) = self.per_worker.iter_mut().find(|(k, _, _)| *k == key) {
                    entry.2 += 1;
                }
                Received::Stored
            }
            Ok(Completion::Ignored) => Received::AlreadyDone,
            Err(_) => Received::Unknown,
        }
    }

    /// `key` is lost: its in-flight items go back to the front of the queue. Returns the
    /// record (also kept for the round's summary).
    pub(crate) fn worker_lost(&mut self, key: &MemberKey, at: Instant, reason: &str) -> LostWorker {
        let requeued = self.scheduler.worker_lost(key).into_iter().map(|i| i.0).collect();
        let lost = LostWorker {
            name: self.name_of(*key),
            at,
            reason: reason.to_string(),
            requeued,
            round: Some(self.number),
        };
        self.lost.push(lost.clone());
        lost
    }

    pub(crate) fn is_done(&self) -> bool {
        self.scheduler.is_done()
    }

    pub(crate) fn progress(&self) -> Progress {
        self.scheduler.progress()
    }

    /// [`ClusterError::NoWorkers`] for this round, after waiting `waited`.
    pub(crate) fn no_workers(&self, waited: std::time::Duration) -> ClusterError {
        let p = self.progress();
        ClusterError::NoWorkers { pending: p.total - p.done, total: p.total, waited }
    }

    /// The results in item order and the round's summary; an error until every item is done.
    pub(crate) fn finish(self, now: Instant) -> Result<RoundResults, SchedulerError> {
        let computed_twice = self.scheduler.progress().computed_twice;
        let results = self.scheduler.into_results()?;
        let summary = RoundSummary {
            round: self.number,
            executed: self.executed,
            computed_twice,
            per_worker: self.per_worker.into_iter().map(|(_, name, n)| (name, n)).collect(),
            lost: self.lost,
            stale: self.stale,
            elapsed: now.saturating_duration_since(self.started),
        };
        Ok(RoundResults { results, summary })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::membership::MemberId;

    fn key(id: u64) -> MemberKey {
        MemberKey { id: MemberId(id), incarnation: 0 }
    }

    fn items(round: u8, n: u8) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![round, i]).collect()
    }

    /// The toy result of an item: depends on its round and index.
    fn out(item: &[u8]) -> Vec<u8> {
        vec![item[0], item[1], 0xAA]
    }

    fn round(number: u64, n: u8) -> (Round, Instant) {
        let t0 = Instant::now();
        (Round::new(number, items(number as u8, n), 2, t0, t0).unwrap(), t0)
    }

    /// A result of round 1 that arrives during round 2, for an item index round 2 also has (and
    /// has handed to the same worker), is dropped: it neither completes the item nor counts as
    /// the worker's, and round 2's results are round 2's alone.
    #[test]
    fn a_late_result_of_the_previous_round_is_ignored() {
        let (mut r, t0) = round(2, 3);
        r.joined(key(0), "a");
        r.joined(key(1), "b");
        let (i0, p0) = r.next_for(&key(0), t0).unwrap();
        assert_eq!((i0, p0.clone()), (0, vec![2, 0]));
        let late = r.receive(key(0), 1, 0, Ok(out(&[1, 0])));
        assert!(matches!(late, Received::Stale), "{late:?}");
        // A late *error* of round 1 fails nothing either.
        let late = r.receive(key(1), 1, 2, Err("round 1 item 2 failed".into()));
        assert!(matches!(late, Received::Stale), "{late:?}");
        // A result from the future (a corrupt tag) is no better.
        assert!(matches!(r.receive(key(0), 3, 0, Ok(vec![0])), Received::Stale));
        assert_eq!(r.progress().done, 0);
        assert!(matches!(r.receive(key(0), 2, 0, Ok(out(&p0))), Received::Stored));
        while let Some((i, p)) = r.next_for(&key(1), t0) {
            assert!(matches!(r.receive(key(1), 2, i, Ok(out(&p))), Received::Stored));
        }
        assert!(r.is_done());
        let done = r.finish(t0 + Duration::from_millis(5)).unwrap();
        assert_eq!(done.results, vec![vec![2, 0, 0xAA], vec![2, 1, 0xAA], vec![2, 2, 0xAA]]);
        let s = done.summary;
        assert_eq!((s.round, s.stale, s.computed_twice), (2, 3, 0));
        assert_eq!(s.executed, vec![1, 1, 1]);
        assert_eq!(s.per_worker, vec![("a".to_string(), 1), ("b".to_string(), 2)]);
        assert_eq!(s.elapsed, Duration::from_millis(5));
    }

    #[test]
    fn an_error_of_this_round_fails_it_naming_item_and_worker() {
        let (mut r, t0) = round(1, 2);
        r.joined(key(4), "w-4");
        let (i, _) = r.next_for(&key(4), t0).unwrap();
        match r.receive(key(4), 1, i, Err("boom".into())) {
            Received::Failed(ClusterError::ItemFailed { item: 0, worker, error }) => {
                assert_eq!((worker.as_str(), error.as_str()), ("w-4", "boom"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(r.receive(key(4), 1, 9, Ok(vec![])), Received::Unknown));
        assert!(r.finish(t0).is_err(), "an unfinished round has no results");
    }

    /// A pinned item goes only to its worker, however free the others are; losing that worker
    /// with the item undone names it and the item, and a worker not joined is reported.
    #[test]
    fn pinned_items_go_to_their_worker_only() {
        let t0 = Instant::now();
        let owners = vec!["b".to_string(), "a".to_string(), "b".to_string()];
        let mut r = Round::new(7, items(7, 3), 2, t0, t0).unwrap().pinned(owners);
        r.joined(key(0), "a");
        r.joined(key(1), "b");
        assert_eq!(r.missing_owner(&["a".into(), "b".into()]), None);
        assert_eq!(r.missing_owner(&["a".into()]), Some("b"));
        let (i, p) = r.next_for(&key(0), t0).unwrap();
        assert_eq!(i, 1, "worker a gets its item, not the first queued one");
        assert!(r.next_for(&key(0), t0).is_none(), "nothing else is a's");
        assert!(matches!(r.receive(key(0), 7, i, Ok(out(&p))), Received::Stored));
        assert!(r.pinned_loss(&key(0)).is_none());
        let (i0, p0) = r.next_for(&key(1), t0).unwrap();
        assert_eq!(i0, 0);
        assert!(matches!(r.receive(key(1), 7, i0, Ok(out(&p0))), Received::Stored));
        let _ = r.next_for(&key(1), t0).unwrap();
        r.worker_lost(&key(1), t0, "killed");
        match r.pinned_loss(&key(1)) {
            Some(ClusterError::PinnedWorkerLost { worker, round, items }) => {
                assert_eq!((worker.as_str(), round, items), ("b", 7, vec![2]));
            }
            other => panic!("{other:?}"),
        }
        assert!(r.pinned_loss(&key(0)).is_none(), "a's items are done");
        assert!(r.next_for(&key(0), t0).is_none(), "b's requeued item never goes to a");
        // An unpinned round never fails on a loss.
        let (mut u, t0) = round(1, 2);
        u.joined(key(0), "a");
        let _ = u.next_for(&key(0), t0);
        u.worker_lost(&key(0), t0, "killed");
        assert!(u.pinned_loss(&key(0)).is_none());
    }

    /// A lost worker's in-flight items are re-queued and computed by another; the loss is in
    /// the round's summary, with the round's number.
    #[test]
    fn a_lost_workers_items_are_requeued_within_the_round() {
        let (mut r, t0) = round(5, 4);
        r.joined(key(0), "victim");
        r.joined(key(1), "survivor");
        let held: Vec<u64> = std::iter::from_fn(|| r.next_for(&key(0), t0).map(|a| a.0)).collect();
        assert_eq!(held, vec![0, 1]);
        let lost = r.worker_lost(&key(0), t0, "connection lost");
        assert_eq!((lost.requeued.clone(), lost.round), (vec![0, 1], Some(5)));
        assert!(r.next_for(&key(0), t0).is_none());
        while !r.is_done() {
            let (i, p) = r.next_for(&key(1), t0).unwrap();
            assert!(matches!(r.receive(key(1), 5, i, Ok(out(&p))), Received::Stored));
        }
        let done = r.finish(t0).unwrap();
        assert_eq!(done.results, (0..4).map(|i| vec![5, i, 0xAA]).collect::<Vec<_>>());
        assert_eq!(done.summary.lost, vec![lost]);
        assert_eq!(
            done.summary.per_worker,
            vec![("victim".to_string(), 0), ("survivor".to_string(), 4)]
        );
    }
}
