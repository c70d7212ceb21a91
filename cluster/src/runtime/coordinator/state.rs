//! What the coordinator does on each event: a worker joins or is lost, a round starts, a result
//! arrives, the job ends.

use super::*;

impl CoordinatorState {
    /// A new worker joins the membership (a fresh member id per connection).
    pub(super) fn join(&mut self, name: &str, address: &str) -> MemberKey {
        let id = MemberId(self.next_id);
        self.next_id += 1;
        let events = self.membership.join(id, address, Role::Worker, Instant::now());
        let key = match events.last() {
            Some(Event::Joined { key, .. }) => *key,
            _ => MemberKey { id, incarnation: 0 },
        };
        self.roster.push((key, name.to_string(), 0));
        key
    }

    /// A joined worker's actor runs: it gets the last broadcast state, then items.
    pub(super) fn add(&mut self, key: MemberKey, handle: Handle) {
        if let Some(blob) = &self.broadcast {
            handle.broadcast(blob);
        }
        self.children.insert(handle.cell().get_id(), key);
        self.workers.insert(key, handle);
        self.empty_since = None;
        let name = self.name_of(key);
        if let Some(active) = &mut self.round {
            active.round.joined(key, &name);
        }
        self.publish_names();
    }

    pub(super) fn publish_names(&self) {
        let names = self.workers.keys().map(|k| self.name_of(*k)).collect();
        self.names.send_replace(names);
    }

    pub(super) fn name_of(&self, key: MemberKey) -> String {
        self.roster
            .iter()
            .find(|(k, _, _)| *k == key)
            .map_or_else(|| format!("{key:?}"), |(_, name, _)| name.clone())
    }

    pub(super) fn start_round(
        &mut self,
        items: Vec<Vec<u8>>,
        owners: Option<Vec<String>>,
        reply: RoundReply,
        now: Instant,
    ) {
        if self.over || self.round.is_some() {
            let why = if self.over { "the job is over" } else { "a round is already running" };
            let _ = reply.send(Err(ClusterError::Runtime(format!("cannot start a round: {why}"))));
            return;
        }
        self.rounds_started += 1;
        let number = self.rounds_started;
        // The first round's wait for a worker counts from the job's start, as the gate's did.
        let wait_from = if number == 1 { self.started } else { now };
        let n = items.len();
        match Round::new(number, items, self.opts.in_flight_per_worker, now, wait_from) {
            Ok(round) => {
                let mut round = match owners {
                    Some(owners) => round.pinned(owners),
                    None => round,
                };
                for key in self.workers.keys() {
                    round.joined(*key, &self.name_of(*key));
                }
                let live: Vec<String> = self.workers.keys().map(|k| self.name_of(*k)).collect();
                if let Some(worker) = round.missing_owner(&live) {
                    let e = ClusterError::PinnedWorkerLost {
                        worker: worker.to_string(),
                        round: number,
                        items: Vec::new(),
                    };
                    info!(round = number, error = %e, "round not started");
                    self.rounds_failed += 1;
                    let _ = reply.send(Err(e));
                    return;
                }
                info!(round = number, items = n, workers = self.workers.len(), "round started");
                self.last_progress = now;
                self.round = Some(Active { round, reply });
            }
            Err(e) => {
                let _ = reply.send(Err(ClusterError::Options(e.to_string())));
            }
        }
    }

    pub(super) fn on_result(
        &mut self,
        key: MemberKey,
        round: u64,
        item: u64,
        result: Result<Vec<u8>, String>,
    ) {
        if self.over {
            return;
        }
        let Some(active) = &mut self.round else {
            self.stale += 1;
            debug!(worker = %self.name_of(key), round, item, "result between rounds; dropped");
            return;
        };
        match active.round.receive(key, round, item, result) {
            Received::Stored => {
                debug!(worker = ?key, round, item, "item done");
                if let Some(entry) = self.roster.iter_mut().find(|(k, _, _)| *k == key) {
                    entry.2 += 1;
                }
            }
            Received::AlreadyDone => debug!(worker = ?key, item, "item already done; dropped"),
            Received::Stale => {
                self.stale += 1;
                let current = active.round.number();
                debug!(worker = ?key, round, current, item, "result of another round; dropped");
            }
            Received::Unknown => {
                warn!(worker = %self.name_of(key), round, item, "result for an unknown item; ignored")
            }
            Received::Failed(e) => {
                warn!(error = %e, "item failed; failing the round");
                self.fail_round(e);
            }
        }
    }

    /// Declares `key` lost (once): no more items for it, its in-flight items re-queued, its actor
    /// stopped.
    pub(super) fn lose(&mut self, key: MemberKey, reason: String) {
        let Some(handle) = self.workers.remove(&key) else {
            return;
        };
        let now = Instant::now();
        let _ = self.membership.leave(key, now);
        let record = match &mut self.round {
            Some(active) => active.round.worker_lost(&key, now, &reason),
            None => LostWorker {
                name: self.name_of(key),
                at: now,
                reason: reason.clone(),
                requeued: Vec::new(),
                round: None,
            },
        };
        info!(worker = %record.name, reason = %reason, round = ?record.round, requeued = ?record.requeued, "worker lost");
        handle.cell().stop(Some(format!("lost: {reason}")));
        self.lost.push(record);
        if self.workers.is_empty() {
            self.empty_since = Some(now);
        }
        self.publish_names();
        if let Some(e) = self.round.as_ref().and_then(|a| a.round.pinned_loss(&key)) {
            self.fail_round(e);
        }
    }

    pub(super) fn log_progress(&mut self, now: Instant) {
        let Some(active) = &self.round else {
            return;
        };
        if now.saturating_duration_since(self.last_progress) >= PROGRESS_EVERY {
            self.last_progress = now;
            let p = active.round.progress();
            let (round, workers) = (active.round.number(), self.workers.len());
            info!(
                round,
                done = p.done,
                total = p.total,
                in_flight = p.in_flight,
                workers,
                "progress"
            );
        }
    }

    /// After any change: open the gate; finish the round when done, fail it when nobody is
    /// left for too long, or hand out its items.
    pub(super) fn after_change(&mut self) {
        if self.over {
            return;
        }
        let now = Instant::now();
        if self.gate.is_some() {
            let waited = now.saturating_duration_since(self.started);
            let remote = self.workers.values().filter(|h| matches!(h, Handle::Remote(_))).count();
            if remote >= self.opts.min_workers || waited >= self.opts.wait_for_workers {
                info!(remote, wanted = self.opts.min_workers, ?waited, "the job starts");
                if let Some(gate) = self.gate.take() {
                    let _ = gate.send(());
                }
            }
        }
        let Some(active) = &mut self.round else {
            return;
        };
        if active.round.is_done() {
            self.complete_round(now);
            return;
        }
        if self.workers.is_empty() {
            let since = self.empty_since.unwrap_or(now).max(active.round.wait_from());
            let empty_for = now.saturating_duration_since(since);
            if !self.networked || empty_for >= self.opts.wait_for_workers {
                let waited = if self.networked { empty_for } else { Duration::ZERO };
                let e = active.round.no_workers(waited);
                self.fail_round(e);
            }
            return;
        }
        // One item per worker in turn while any takes one (so a round spreads evenly however
        // many items a worker may hold), then each worker's items in one message.
        let number = active.round.number();
        let mut given: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); self.workers.len()];
        loop {
            let mut any = false;
            for ((key, _), mine) in self.workers.iter().zip(given.iter_mut()) {
                if let Some((item, payload)) = active.round.next_for(key, now) {
                    debug!(worker = ?key, round = number, item, "item assigned");
                    mine.push((item, payload));
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        for ((_, handle), mine) in self.workers.iter().zip(given) {
            // A gone actor: the supervision event re-queues its items.
            if !mine.is_empty() && !handle.assign(number, mine) {
                debug!(round = number, "items not delivered: the worker's actor is gone");
            }
        }
    }

    pub(super) fn complete_round(&mut self, now: Instant) {
        let Some(Active { round, reply }) = self.round.take() else {
            return;
        };
        let number = round.number();
        match round.finish(now) {
            Ok(done) => {
                let s = &done.summary;
                info!(round = number, items = s.executed.len(), elapsed = ?s.elapsed, lost = s.lost.len(), stale = s.stale, "round finished");
                self.summaries.push(done.summary.clone());
                let _ = reply.send(Ok(done));
            }
            Err(e) => {
                self.rounds_failed += 1;
                let _ = reply.send(Err(ClusterError::Runtime(format!("round {number}: {e}"))));
            }
        }
    }

    /// The running round failed: its queued items are dropped on every worker (the running ones
    /// finish, and their results are dropped as stale), and the driver gets `error`.
    pub(super) fn fail_round(&mut self, error: ClusterError) {
        let Some(Active { round, reply }) = self.round.take() else {
            return;
        };
        let number = round.number();
        self.rounds_failed += 1;
        for handle in self.workers.values() {
            handle.cancel(number);
        }
        info!(round = number, error = %error, "round failed");
        let _ = reply.send(Err(error));
    }

    /// The job is over: tell every worker `last` (`Done`, or `Abort`), then deliver the summary
    /// once every child stopped (or after a grace period).
    pub(super) fn end(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        last: Wire,
        reply: oneshot::Sender<JobSummary>,
    ) {
        if self.over {
            return; // the first End's reply gets the summary; this one's sender just drops
        }
        if self.round.is_some() {
            let reason = match &last {
                Wire::Abort { reason } => reason.clone(),
                _ => "the job ended".into(),
            };
            self.fail_round(ClusterError::Aborted { reason });
        }
        self.over = true;
        self.end_reply = Some(reply);
        for handle in std::mem::take(&mut self.workers).into_values() {
            handle.finish(last.clone());
        }
        self.publish_names();
        if self.children.is_empty() {
            self.deliver(myself);
        } else {
            // Detached timer: the coordinator delivers without it if every child stops sooner.
            myself.send_after(FINISH_GRACE, || CoordinatorMsg::FinishTimeout);
        }
    }

    pub(super) fn deliver(&mut self, myself: &ActorRef<CoordinatorMsg>) {
        if let Some(reply) = self.end_reply.take() {
            let summary = JobSummary {
                rounds: std::mem::take(&mut self.summaries),
                rounds_failed: self.rounds_failed,
                per_worker: self.roster.iter().map(|(_, name, n)| (name.clone(), *n)).collect(),
                lost: std::mem::take(&mut self.lost),
                stale: self.stale,
                refused: 0,
                elapsed: self.started.elapsed(),
            };
            info!(
                rounds = summary.rounds.len(),
                failed = summary.rounds_failed,
                lost = summary.lost.len(),
                "job finished"
            );
            let _ = reply.send(summary);
        }
        myself.stop(None);
    }
}
