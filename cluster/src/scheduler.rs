//! Work-item scheduling: a pure state machine.
//!
//! The coordinator owns one [`Scheduler`] per batch of work (for evaluation: the batch-aligned ranges
//! of a task's test set). It hands items to workers ([`Scheduler::next_for`]), records their results
//! ([`Scheduler::complete`]), re-queues the items of a lost worker ([`Scheduler::worker_lost`]) and
//! finally reduces the results in item order ([`Scheduler::fold`]), so the reduction never depends on
//! which worker finished first. Like quinn-proto's core, it does no I/O and reads no clock: the caller
//! passes `now`, so tests drive it through simulated time.
//!
//! Item ids are the positions of the items in the list given to [`Scheduler::new`]; that list is the
//! fixed order of the reduction.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Stable id of a work item: its position in the list given to [`Scheduler::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ItemId(pub usize);

/// Errors of the scheduler; each names what the caller got wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    /// A result named an item id that this scheduler never issued (a message from another run or a
    /// corrupted id). Drop the message.
    #[error("unknown work item {id:?}: this scheduler has {total} items")]
    UnknownItem {
        /// The id received.
        id: ItemId,
        /// Number of items in this scheduler.
        total: usize,
    },
    /// The results were asked for before every item was done; wait for [`Scheduler::is_done`].
    #[error("{missing} of {total} work items are not done yet")]
    NotDone {
        /// Items without a result.
        missing: usize,
        /// Number of items in this scheduler.
        total: usize,
    },
    /// The in-flight limit must be at least one, or no worker could ever get work.
    #[error("the per-worker in-flight limit must be at least 1")]
    ZeroLimit,
}

/// One item handed to a worker by [`Scheduler::next_for`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment<'a, T> {
    /// The item's stable id; the worker sends it back with the result.
    pub id: ItemId,
    /// The item's payload (for evaluation: the range of the test set).
    pub payload: &'a T,
    /// When the item is re-queued for another worker if this one has not answered (straggler
    /// deadline), or `None` when the scheduler has no assignment timeout.
    pub deadline: Option<Instant>,
}

/// What [`Scheduler::complete`] did with a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion<W> {
    /// The result was stored. `redundant` lists the other workers that still hold the item (it was
    /// re-queued after a timeout or loss); the caller may tell them to cancel it.
    Accepted {
        /// Other workers computing the same item; their results will be ignored.
        redundant: Vec<W>,
    },
    /// The item was already done; the result was dropped and nothing was double-counted.
    Ignored,
}

/// Counts for a progress bar and for the run report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Items with a stored result.
    pub done: usize,
    /// Items in this scheduler.
    pub total: usize,
    /// Items held by at least one worker and not done.
    pub in_flight: usize,
    /// Items waiting in the queue (not done).
    pub queued: usize,
    /// Results that arrived for an item another worker had already finished: work computed twice
    /// (zero unless a lost or timed-out worker answered late).
    pub computed_twice: usize,
    /// Results repeated by the same worker that finished the item (a retransmitted message); ignored.
    pub duplicates: usize,
}

#[derive(Debug)]
struct ItemState<W> {
    /// Workers holding the item, each with its straggler deadline (cleared once it fired).
    holders: Vec<(W, Option<Instant>)>,
    queued: bool,
    done_by: Option<W>,
}

/// A pure work-item scheduler, generic over the payload `T`, the result `R` and the worker key `W`.
///
/// Use a key that changes when a worker restarts (for example membership's
/// [`MemberKey`](crate::membership::MemberKey), which carries the incarnation), so a restarted worker
/// is a new worker here and never inherits the old one's items.
#[derive(Debug)]
pub struct Scheduler<T, R, W> {
    payloads: Vec<T>,
    results: Vec<Option<R>>,
    items: Vec<ItemState<W>>,
    queue: VecDeque<ItemId>,
    held: HashMap<W, Vec<ItemId>>,
    lost: HashSet<W>,
    limit: usize,
    timeout: Option<Duration>,
    done: usize,
    computed_twice: usize,
    duplicates: usize,
}

impl<T, R, W: Clone + Eq + Hash> Scheduler<T, R, W> {
    /// A scheduler over `items`, in this order, with an in-flight limit of one item per worker and no
    /// straggler timeout.
    pub fn new(items: impl IntoIterator<Item = T>) -> Self {
        let payloads: Vec<T> = items.into_iter().collect();
        let n = payloads.len();
        Self {
            results: (0..n).map(|_| None).collect(),
            items: (0..n)
                .map(|_| ItemState { holders: Vec::new(), queued: true, done_by: None })
                .collect(),
            queue: (0..n).map(ItemId).collect(),
            payloads,
            held: HashMap::new(),
            lost: HashSet::new(),
            limit: 1,
            timeout: None,
            done: 0,
            computed_twice: 0,
            duplicates: 0,
        }
    }

    /// Sets how many items one worker may hold at once (its credits): a fast worker comes back for
    /// more sooner, so it gets more items.
    pub fn with_in_flight_limit(mut self, limit: usize) -> Result<Self, SchedulerError> {
        if limit == 0 {
            return Err(SchedulerError::ZeroLimit);
        }
        self.limit = limit;
        Ok(self)
    }

    /// Re-queues an item for another worker when its holder has not answered within `timeout` (see
    /// [`Scheduler::expire`]); the straggler keeps the item, and whichever result comes first counts.
    pub fn with_assignment_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The next item for `worker`, or `None` when it holds its limit, was declared lost, or nothing
    /// is queued. Items come out in id order, re-queued items first.
    pub fn next_for(&mut self, worker: &W, now: Instant) -> Option<Assignment<'_, T>> {
        self.next_for_where(worker, now, |_| true)
    }

    /// As [`Scheduler::next_for`], among the items `allowed` accepts for this worker only (items
    /// pinned to one worker): the first queued one in id order.
    pub fn next_for_where(
        &mut self,
        worker: &W,
        now: Instant,
        allowed: impl Fn(ItemId) -> bool,
    ) -> Option<Assignment<'_, T>> {
        if self.lost.contains(worker) {
            return None;
        }
        if self.held.get(worker).map_or(0, Vec::len) >= self.limit {
            return None;
        }
        // Drop stale entries (done while queued), then take the first item this worker does not hold.
        while let Some(&front) = self.queue.front() {
            if self.items[front.0].done_by.is_some() {
                self.items[front.0].queued = false;
                self.queue.pop_front();
            } else {
                break;
            }
        }
        let pos = self.queue.iter().position(|id| {
            let st = &self.items[id.0];
            st.done_by.is_none() && !st.holders.iter().any(|(w, _)| w == worker) && allowed(*id)
        })?;
        let id = self.queue.remove(pos)?;
        let deadline = self.timeout.map(|t| now + t);
        let st = &mut self.items[id.0];
        st.queued = false;
        st.holders.push((worker.clone(), deadline));
        self.held.entry(worker.clone()).or_default().push(id);
        Some(Assignment { id, payload: &self.payloads[id.0], deadline })
    }

    /// Records `worker`'s result for `id`. The first result for an item is stored, even from a worker
    /// that no longer holds it (it was declared lost, or timed out); any later one is dropped and
    /// counted in [`Progress::computed_twice`] (another worker) or [`Progress::duplicates`] (the same
    /// worker again).
    pub fn complete(
        &mut self,
        worker: &W,
        id: ItemId,
        result: R,
    ) -> Result<Completion<W>, SchedulerError> {
        if id.0 >= self.items.len() {
            return Err(SchedulerError::UnknownItem { id, total: self.items.len() });
        }
        self.release(worker, id);
        let st = &mut self.items[id.0];
        if let Some(done_by) = &st.done_by {
            if done_by == worker {
                self.duplicates += 1;
            } else {
                self.computed_twice += 1;
            }
            return Ok(Completion::Ignored);
        }
        st.done_by = Some(worker.clone());
        let redundant: Vec<W> = st.holders.iter().map(|(w, _)| w.clone()).collect();
        for w in &redundant {
            self.release(w, id);
        }
        self.results[id.0] = Some(result);
        self.done += 1;
        Ok(Completion::Accepted { redundant })
    }

    /// Declares `worker` lost: it gets no more items, and the items it held that nobody else holds go
    /// back to the FRONT of the queue in id order. Returns those items. A late result from it is
    /// still accepted if the item is not done by then.
    pub fn worker_lost(&mut self, worker: &W) -> Vec<ItemId> {
        self.lost.insert(worker.clone());
        let ids = self.held.remove(worker).unwrap_or_default();
        let mut requeue = Vec::new();
        for id in ids {
            let st = &mut self.items[id.0];
            st.holders.retain(|(w, _)| w != worker);
            if st.done_by.is_none() && st.holders.is_empty() && !st.queued {
                requeue.push(id);
            }
        }
        self.requeue_front(requeue)
    }

    /// Re-queues (at the front, in id order) every held item whose straggler deadline is at or before
    /// `now` and that is not already queued or done. The holder keeps it. Returns those items; with no
    /// assignment timeout this is always empty.
    pub fn expire(&mut self, now: Instant) -> Vec<ItemId> {
        let mut requeue = Vec::new();
        for (i, st) in self.items.iter_mut().enumerate() {
            if st.done_by.is_some() {
                continue;
            }
            let mut fired = false;
            for (_, deadline) in st.holders.iter_mut() {
                if deadline.is_some_and(|d| d <= now) {
                    *deadline = None;
                    fired = true;
                }
            }
            if fired && !st.queued {
                requeue.push(ItemId(i));
            }
        }
        self.requeue_front(requeue)
    }

    /// The earliest straggler deadline still pending, so the caller knows when to call
    /// [`Scheduler::expire`].
    pub fn next_deadline(&self) -> Option<Instant> {
        self.items
            .iter()
            .filter(|st| st.done_by.is_none())
            .flat_map(|st| st.holders.iter().filter_map(|(_, d)| *d))
            .min()
    }

    /// Whether every item has a result.
    pub fn is_done(&self) -> bool {
        self.done == self.items.len()
    }

    /// Counts for a progress bar and the run report.
    pub fn progress(&self) -> Progress {
        let pending = self.items.iter().filter(|st| st.done_by.is_none());
        let (mut in_flight, mut queued) = (0, 0);
        for st in pending {
            in_flight += usize::from(!st.holders.is_empty());
            queued += usize::from(st.queued);
        }
        Progress {
            done: self.done,
            total: self.items.len(),
            in_flight,
            queued,
            computed_twice: self.computed_twice,
            duplicates: self.duplicates,
        }
    }

    /// The items `worker` holds now, in the order they were assigned.
    pub fn held_by(&self, worker: &W) -> &[ItemId] {
        self.held.get(worker).map_or(&[], Vec::as_slice)
    }

    /// The results in item-id order, independent of completion order; an error until all are done.
    pub fn results_in_order(&self) -> Result<Vec<&R>, SchedulerError> {
        self.check_done()?;
        Ok(self.results.iter().flatten().collect())
    }

    /// Folds the results in item-id order (`f(f(f(init, r0), r1), r2)…`), independent of completion
    /// order; an error until all are done.
    pub fn fold<A>(&self, init: A, f: impl FnMut(A, &R) -> A) -> Result<A, SchedulerError> {
        self.check_done()?;
        Ok(self.results.iter().flatten().fold(init, f))
    }

    /// Consumes the scheduler and returns the results in item-id order; an error until all are done.
    pub fn into_results(self) -> Result<Vec<R>, SchedulerError> {
        self.check_done()?;
        Ok(self.results.into_iter().flatten().collect())
    }

    fn check_done(&self) -> Result<(), SchedulerError> {
        if self.is_done() {
            Ok(())
        } else {
            Err(SchedulerError::NotDone {
                missing: self.items.len() - self.done,
                total: self.items.len(),
            })
        }
    }

    /// Removes `worker` as a holder of `id` (if it is one).
    fn release(&mut self, worker: &W, id: ItemId) {
        self.items[id.0].holders.retain(|(w, _)| w != worker);
        if let Some(ids) = self.held.get_mut(worker) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.held.remove(worker);
            }
        }
    }

    fn requeue_front(&mut self, mut ids: Vec<ItemId>) -> Vec<ItemId> {
        ids.sort_unstable();
        for &id in ids.iter().rev() {
            self.items[id.0].queued = true;
            self.queue.push_front(id);
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Instant {
        // Simulated time: a fixed base plus an offset; the clock is never read again.
        thread_local!(static BASE: Instant = Instant::now());
        BASE.with(|b| *b + Duration::from_millis(ms))
    }

    /// Result of "computing" item `i`: chosen so that a fold in another order gives other bits.
    fn compute(i: usize) -> f32 {
        1.0 / (i as f32 + 1.0) + 1e7 * ((i % 3) as f32 - 1.0)
    }

    fn sequential(n: usize) -> f32 {
        (0..n).map(compute).fold(0.0f32, |a, r| a + r)
    }

    type Sched = Scheduler<usize, f32, u32>;

    fn fold_of(s: &Sched) -> f32 {
        s.fold(0.0f32, |a, r| a + r).expect("all done")
    }

    #[test]
    fn single_worker_gets_items_in_order_and_folds_them() {
        let mut s = Sched::new(0..5);
        assert!(matches!(
            s.fold(0.0, |a, r| a + r),
            Err(SchedulerError::NotDone { missing: 5, total: 5 })
        ));
        for expect in 0..5 {
            let a = s.next_for(&7, t(0)).expect("an item");
            let (id, payload) = (a.id, *a.payload);
            assert_eq!((id, payload), (ItemId(expect), expect));
            assert!(s.next_for(&7, t(0)).is_none(), "limit of one item in flight");
            let r = compute(payload);
            assert_eq!(s.complete(&7, id, r), Ok(Completion::Accepted { redundant: vec![] }));
        }
        assert!(s.is_done());
        assert!(s.next_for(&7, t(0)).is_none());
        assert_eq!(fold_of(&s).to_bits(), sequential(5).to_bits());
        let p = s.progress();
        assert_eq!((p.done, p.total, p.in_flight, p.queued, p.computed_twice), (5, 5, 0, 0, 0));
    }

    #[test]
    fn empty_scheduler_is_done() {
        let s = Sched::new(Vec::new());
        assert!(s.is_done());
        assert_eq!(s.into_results(), Ok(vec![]));
    }

    #[test]
    fn credits_let_a_fast_worker_take_more() {
        let mut s = Sched::new(0..10).with_in_flight_limit(2).expect("limit");
        assert_eq!(Sched::new(0..1).with_in_flight_limit(0).err(), Some(SchedulerError::ZeroLimit));
        let slow: Vec<ItemId> = std::iter::from_fn(|| s.next_for(&1, t(0)).map(|a| a.id)).collect();
        assert_eq!(slow, vec![ItemId(0), ItemId(1)]);
        let mut fast = Vec::new();
        while let Some(a) = s.next_for(&2, t(0)) {
            let (id, r) = (a.id, compute(*a.payload));
            fast.push(id);
            s.complete(&2, id, r).expect("known item");
        }
        assert!(s.next_for(&2, t(0)).is_none());
        assert_eq!(fast.len(), 8, "the fast worker took every item the slow one did not hold");
        assert_eq!(s.held_by(&1), &[ItemId(0), ItemId(1)]);
        assert_eq!(s.progress().in_flight, 2);
    }

    #[test]
    fn lost_worker_items_go_back_to_the_front_in_id_order() {
        let mut s = Sched::new(0..8).with_in_flight_limit(3).expect("limit");
        let a: Vec<ItemId> = (0..3).filter_map(|_| s.next_for(&1, t(0)).map(|a| a.id)).collect();
        let b: Vec<ItemId> = (0..3).filter_map(|_| s.next_for(&2, t(0)).map(|a| a.id)).collect();
        assert_eq!(a, vec![ItemId(0), ItemId(1), ItemId(2)]);
        assert_eq!(b, vec![ItemId(3), ItemId(4), ItemId(5)]);
        s.complete(&1, ItemId(1), compute(1)).expect("known");
        assert_eq!(s.worker_lost(&1), vec![ItemId(0), ItemId(2)]);
        assert!(s.next_for(&1, t(1)).is_none(), "a lost worker gets no more work");
        let order: Vec<ItemId> =
            (0..3).filter_map(|_| s.next_for(&3, t(1)).map(|a| a.id)).collect();
        assert_eq!(order, vec![ItemId(0), ItemId(2), ItemId(6)]);
        assert_eq!(s.progress().computed_twice, 0);
    }

    #[test]
    fn late_result_from_a_lost_worker_counts_once() {
        let mut s = Sched::new(0..2);
        assert_eq!(s.next_for(&1, t(0)).map(|a| a.id), Some(ItemId(0)));
        assert_eq!(s.worker_lost(&1), vec![ItemId(0)]);
        assert_eq!(s.next_for(&2, t(10)).map(|a| a.id), Some(ItemId(0)));
        // The lost worker's result arrives late: accepted, and worker 2's copy is now redundant.
        assert_eq!(
            s.complete(&1, ItemId(0), compute(0)),
            Ok(Completion::Accepted { redundant: vec![2] })
        );
        assert!(s.held_by(&2).is_empty());
        assert_eq!(s.complete(&2, ItemId(0), compute(0)), Ok(Completion::Ignored));
        assert_eq!(s.complete(&1, ItemId(0), compute(0)), Ok(Completion::Ignored));
        let p = s.progress();
        assert_eq!((p.done, p.computed_twice, p.duplicates), (1, 1, 1));
        assert_eq!(s.next_for(&2, t(20)).map(|a| a.id), Some(ItemId(1)));
        s.complete(&2, ItemId(1), compute(1)).expect("known");
        assert_eq!(s.into_results(), Ok(vec![compute(0), compute(1)]));
    }

    #[test]
    fn late_result_before_reassignment_removes_the_queued_copy() {
        let mut s = Sched::new(0..2);
        s.next_for(&1, t(0));
        s.worker_lost(&1);
        assert_eq!(s.progress().queued, 2);
        assert_eq!(s.complete(&1, ItemId(0), 5.0), Ok(Completion::Accepted { redundant: vec![] }));
        assert_eq!(s.progress().queued, 1);
        assert_eq!(s.next_for(&2, t(1)).map(|a| a.id), Some(ItemId(1)), "the done item is skipped");
        assert_eq!(s.progress().computed_twice, 0);
    }

    #[test]
    fn unknown_item_is_an_error() {
        let mut s = Sched::new(0..2);
        assert_eq!(
            s.complete(&1, ItemId(2), 0.0),
            Err(SchedulerError::UnknownItem { id: ItemId(2), total: 2 })
        );
    }

    #[test]
    fn straggler_item_is_requeued_after_its_deadline() {
        let mut s = Sched::new(0..3)
            .with_assignment_timeout(Duration::from_secs(10))
            .with_in_flight_limit(2)
            .expect("limit");
        let a = s.next_for(&1, t(0)).expect("item");
        assert_eq!((a.id, a.deadline), (ItemId(0), Some(t(10_000))));
        assert_eq!(s.next_deadline(), Some(t(10_000)));
        assert!(s.expire(t(9_999)).is_empty());
        assert_eq!(s.expire(t(10_000)), vec![ItemId(0)]);
        assert!(s.expire(t(20_000)).is_empty(), "a deadline fires once");
        assert_eq!(s.next_deadline(), None);
        // Worker 1 still holds item 0, so it is not offered it again but gets the next one.
        assert_eq!(s.next_for(&1, t(10_001)).map(|a| a.id), Some(ItemId(1)));
        assert_eq!(s.progress().queued, 2);
        // Worker 2 gets the re-queued straggler item first.
        assert_eq!(s.next_for(&2, t(10_001)).map(|a| a.id), Some(ItemId(0)));
        assert_eq!(s.complete(&2, ItemId(0), 1.0), Ok(Completion::Accepted { redundant: vec![1] }));
        assert_eq!(s.complete(&1, ItemId(0), 1.0), Ok(Completion::Ignored));
        assert_eq!(s.progress().computed_twice, 1);
    }

    /// 3 workers, one lost mid-run: the fold equals the single-worker fold bit for bit, and no item
    /// whose result had arrived is computed again.
    #[test]
    fn three_workers_one_lost_equals_single_worker_fold() {
        let n = 40;
        let mut s = Sched::new(0..n).with_in_flight_limit(2).expect("limit");
        let mut computed = vec![0u32; n];
        let mut now = 0;
        let mut alive = vec![0u32, 1, 2];
        let mut step = 0;
        while !s.is_done() {
            step += 1;
            now += 100;
            if step == 7 {
                // Worker 1 dies holding items; the work it did not report is lost with it.
                let held: Vec<ItemId> = s.held_by(&1).to_vec();
                assert!(!held.is_empty());
                let requeued = s.worker_lost(&1);
                assert_eq!(requeued, held);
                alive.retain(|&w| w != 1);
            }
            for &w in &alive {
                while s.next_for(&w, t(now)).is_some() {}
                // Workers finish their oldest item, worker 0 twice as fast as worker 2.
                let rounds = if w == 0 { 2 } else { 1 };
                for _ in 0..rounds {
                    if let Some(&id) = s.held_by(&w).first() {
                        computed[id.0] += 1;
                        s.complete(&w, id, compute(id.0)).expect("known");
                    }
                }
            }
        }
        assert!(computed.iter().all(|&c| c == 1), "every item computed exactly once: {computed:?}");
        assert_eq!(fold_of(&s).to_bits(), sequential(n).to_bits());
        assert_eq!(s.progress().computed_twice, 0);
    }

    use crate::test_rng::Rng;

    /// Random interleavings of assignment, completion (any order), loss, rejoin (as a new worker key),
    /// late and duplicated results: the fold always equals the sequential fold, and every count adds up.
    #[test]
    fn random_interleavings_fold_like_one_worker() {
        for seed in 0..300u64 {
            let mut rng = Rng(seed);
            let n = rng.below(30);
            let limit = 1 + rng.below(3);
            let mut s = Sched::new(0..n).with_in_flight_limit(limit).expect("limit");
            let mut alive: Vec<u32> = (0..1 + rng.below(4) as u32).collect();
            let mut next_key = alive.len() as u32;
            let mut zombies: Vec<(u32, ItemId)> = Vec::new(); // results a lost worker may still send
            let mut now = 0;
            let mut accepted = 0usize;
            let mut ignored = 0usize;
            for _ in 0..10_000 {
                if s.is_done() {
                    break;
                }
                now += 1 + rng.below(50) as u64;
                let w = alive[rng.below(alive.len())];
                match rng.below(10) {
                    0..=3 => {
                        let _ = s.next_for(&w, t(now));
                    }
                    4..=6 => {
                        let held = s.held_by(&w).to_vec();
                        if !held.is_empty() {
                            let id = held[rng.below(held.len())];
                            match s.complete(&w, id, compute(id.0)).expect("known") {
                                Completion::Accepted { redundant } => {
                                    accepted += 1;
                                    zombies.extend(redundant.into_iter().map(|r| (r, id)));
                                }
                                Completion::Ignored => ignored += 1,
                            }
                        }
                    }
                    7 if alive.len() > 1 || rng.below(4) == 0 => {
                        zombies.extend(s.held_by(&w).iter().map(|&id| (w, id)));
                        s.worker_lost(&w);
                        alive.retain(|&x| x != w);
                        if alive.is_empty() || rng.below(2) == 0 {
                            alive.push(next_key); // the same process rejoining: a new key
                            next_key += 1;
                        }
                    }
                    8 if !zombies.is_empty() => {
                        let (z, id) = zombies.swap_remove(rng.below(zombies.len()));
                        match s.complete(&z, id, compute(id.0)).expect("known") {
                            Completion::Accepted { .. } => accepted += 1,
                            Completion::Ignored => ignored += 1,
                        }
                    }
                    _ => {
                        // A retransmitted result for an item this worker already finished.
                        if n > 0 {
                            let id = ItemId(rng.below(n));
                            if s.progress().done > 0 && s.items[id.0].done_by.as_ref() == Some(&w) {
                                assert_eq!(
                                    s.complete(&w, id, compute(id.0)),
                                    Ok(Completion::Ignored)
                                );
                                ignored += 1;
                            }
                        }
                    }
                }
            }
            assert!(s.is_done(), "seed {seed}: not done");
            let p = s.progress();
            assert_eq!(accepted, n, "seed {seed}");
            assert_eq!(p.computed_twice + p.duplicates, ignored, "seed {seed}");
            assert_eq!((p.done, p.in_flight, p.queued), (n, 0, 0), "seed {seed}");
            assert_eq!(fold_of(&s).to_bits(), sequential(n).to_bits(), "seed {seed}");
            let got: Vec<f32> = s.into_results().expect("done");
            assert_eq!(got, (0..n).map(compute).collect::<Vec<_>>(), "seed {seed}");
        }
    }
}
