//! Cluster membership and heartbeats: a pure state machine.
//!
//! Every member sends a heartbeat each [`MembershipConfig::heartbeat_interval`] (0.5 s by default).
//! [`Membership::tick`] declares a member [`Health::Suspect`] once it has been silent for longer than
//! [`MembershipConfig::suspect_after`] (one interval by default, i.e. one missed heartbeat) and
//! [`Health::Lost`] once silent for longer than [`MembershipConfig::lost_after`] (3 s by default). A
//! lost or departed member that joins again with the same id is a new *incarnation*: it gets a new
//! [`MemberKey`], so nothing keyed by the old one (its work items in the
//! [`Scheduler`](crate::scheduler::Scheduler), say) is ever silently reused. No I/O and no clock: the
//! caller passes `now`, so tests drive it through simulated time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A member's id as it announces itself (stable across restarts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberId(pub u64);

/// One incarnation of a member: its id plus a number that grows each time it joins again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberKey {
    /// The member's id.
    pub id: MemberId,
    /// 0 at the first join, then one more at each re-join.
    pub incarnation: u64,
}

/// What a member does in the cluster (DESIGN.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Owns the plan, the sweep store and checkpoints.
    Coordinator,
    /// Runs models (one per GPU, or one CPU worker).
    Worker,
    /// Owns decoded, preprocessed dataset shards and serves batches.
    DatasetShard,
}

/// A member's health as last judged by [`Membership::tick`] or a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Heard from within `suspect_after`.
    Alive,
    /// Silent for longer than `suspect_after`, not yet `lost_after`.
    Suspect,
    /// Silent for longer than `lost_after`; it must join again (as a new incarnation).
    Lost,
    /// Left gracefully; it must join again (as a new incarnation).
    Left,
}

/// Timing of the failure detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MembershipConfig {
    /// How often members send heartbeats (0.5 s).
    pub heartbeat_interval: Duration,
    /// Silence after which a member is suspect (one interval: one missed heartbeat).
    pub suspect_after: Duration,
    /// Silence after which a member is lost (3 s).
    pub lost_after: Duration,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(500),
            suspect_after: Duration::from_millis(500),
            lost_after: Duration::from_secs(3),
        }
    }
}

/// Errors of the membership state machine; each says what the caller should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// `lost_after` must exceed `suspect_after`, and `suspect_after` must not be zero.
    #[error("invalid membership timing {0:?}: need 0 < suspect_after < lost_after")]
    InvalidConfig(MembershipConfig),
    /// A message came from an id that never joined; it must join first.
    #[error("member {0:?} is not known: it must join first")]
    UnknownMember(MemberId),
    /// A message came from an old incarnation (or a lost/departed one); drop it. The process must
    /// join again to get a new incarnation.
    #[error("stale message from {got:?}: the current incarnation is {current:?} ({health:?})")]
    StaleIncarnation {
        /// The key the message carried.
        got: MemberKey,
        /// The key the membership knows.
        current: MemberKey,
        /// The current incarnation's health.
        health: Health,
    },
}

/// A change of membership, to be acted on by the caller (a `Lost` worker goes to
/// [`Scheduler::worker_lost`](crate::scheduler::Scheduler::worker_lost)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new incarnation joined.
    Joined {
        /// The new incarnation.
        key: MemberKey,
        /// Its role.
        role: Role,
        /// Its address, as it announced it.
        address: String,
    },
    /// Silent for longer than `suspect_after`.
    Suspect {
        /// The member.
        key: MemberKey,
    },
    /// A suspect member was heard from again.
    Recovered {
        /// The member.
        key: MemberKey,
    },
    /// Silent for longer than `lost_after`, or replaced by a newer incarnation of the same id.
    Lost {
        /// The incarnation that is gone.
        key: MemberKey,
        /// Its role.
        role: Role,
    },
    /// Left gracefully.
    Left {
        /// The incarnation that left.
        key: MemberKey,
        /// Its role.
        role: Role,
    },
}

/// What the membership knows of one member (its latest incarnation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Id and incarnation.
    pub key: MemberKey,
    /// Address it announced at join.
    pub address: String,
    /// Its role.
    pub role: Role,
    /// Current health.
    pub health: Health,
    /// When it was last heard from (join or heartbeat).
    pub last_seen: Instant,
}

/// The membership state machine: one entry per member id, holding its latest incarnation.
#[derive(Debug, Clone)]
pub struct Membership {
    config: MembershipConfig,
    members: BTreeMap<MemberId, Member>,
}

impl Membership {
    /// An empty membership with the given timing.
    pub fn new(config: MembershipConfig) -> Result<Self, MembershipError> {
        if config.suspect_after.is_zero() || config.lost_after <= config.suspect_after {
            return Err(MembershipError::InvalidConfig(config));
        }
        Ok(Self { config, members: BTreeMap::new() })
    }

    /// The timing in use.
    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// `id` joins at `now`. A first join gets incarnation 0; a join by an id already known (lost,
    /// departed, or still alive: a restarted process) gets the next incarnation, and a still-live
    /// old incarnation is reported `Lost` first. Returns the events (ending with `Joined`); the new
    /// key is in the last one and in [`Membership::get`].
    pub fn join(
        &mut self,
        id: MemberId,
        address: impl Into<String>,
        role: Role,
        now: Instant,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        let incarnation = match self.members.get(&id) {
            None => 0,
            Some(old) => {
                if matches!(old.health, Health::Alive | Health::Suspect) {
                    events.push(Event::Lost { key: old.key, role: old.role });
                }
                old.key.incarnation + 1
            }
        };
        let key = MemberKey { id, incarnation };
        let address = address.into();
        self.members.insert(
            id,
            Member { key, address: address.clone(), role, health: Health::Alive, last_seen: now },
        );
        events.push(Event::Joined { key, role, address });
        events
    }

    /// A heartbeat from `key` at `now`. Returns `Recovered` if it was suspect. A heartbeat from an
    /// unknown id, an old incarnation, or a lost or departed member is an error: that process must
    /// join again.
    pub fn on_heartbeat(
        &mut self,
        key: MemberKey,
        now: Instant,
    ) -> Result<Option<Event>, MembershipError> {
        let m = self.current_mut(key)?;
        m.last_seen = m.last_seen.max(now);
        if m.health == Health::Suspect {
            m.health = Health::Alive;
            return Ok(Some(Event::Recovered { key }));
        }
        Ok(None)
    }

    /// `key` leaves gracefully at `now`; returns `Left`.
    pub fn leave(&mut self, key: MemberKey, now: Instant) -> Result<Event, MembershipError> {
        let m = self.current_mut(key)?;
        m.health = Health::Left;
        m.last_seen = m.last_seen.max(now);
        Ok(Event::Left { key, role: m.role })
    }

    /// Judges every live member's silence at `now`; returns the changes in member-id order. A member
    /// silent past `lost_after` is reported `Lost` once (without a `Suspect` first if it skipped that
    /// stage between two ticks).
    pub fn tick(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        for m in self.members.values_mut() {
            if !matches!(m.health, Health::Alive | Health::Suspect) {
                continue;
            }
            let silent = now.saturating_duration_since(m.last_seen);
            if silent > self.config.lost_after {
                m.health = Health::Lost;
                events.push(Event::Lost { key: m.key, role: m.role });
            } else if silent > self.config.suspect_after && m.health == Health::Alive {
                m.health = Health::Suspect;
                events.push(Event::Suspect { key: m.key });
            }
        }
        events
    }

    /// The latest incarnation of `id`, whatever its health.
    pub fn get(&self, id: MemberId) -> Option<&Member> {
        self.members.get(&id)
    }

    /// Members that are alive or suspect (not lost, not departed), in id order; `role` filters.
    pub fn live(&self, role: Option<Role>) -> impl Iterator<Item = &Member> {
        self.members.values().filter(move |m| {
            matches!(m.health, Health::Alive | Health::Suspect) && role.is_none_or(|r| r == m.role)
        })
    }

    /// When the next tick can change something: the earliest moment a live member crosses its next
    /// threshold. `None` when no member is live.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.live(None)
            .map(|m| match m.health {
                Health::Alive => m.last_seen + self.config.suspect_after,
                _ => m.last_seen + self.config.lost_after,
            })
            .min()
    }

    fn current_mut(&mut self, key: MemberKey) -> Result<&mut Member, MembershipError> {
        let m = self.members.get_mut(&key.id).ok_or(MembershipError::UnknownMember(key.id))?;
        if m.key != key || !matches!(m.health, Health::Alive | Health::Suspect) {
            return Err(MembershipError::StaleIncarnation {
                got: key,
                current: m.key,
                health: m.health,
            });
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Instant {
        thread_local!(static BASE: Instant = Instant::now());
        BASE.with(|b| *b + Duration::from_millis(ms))
    }

    fn joined_key(events: &[Event]) -> MemberKey {
        match events.last() {
            Some(Event::Joined { key, .. }) => *key,
            other => panic!("expected Joined last, got {other:?}"),
        }
    }

    fn fresh() -> Membership {
        Membership::new(MembershipConfig::default()).expect("default config is valid")
    }

    #[test]
    fn rejects_inconsistent_timing() {
        let bad = MembershipConfig { lost_after: Duration::from_millis(400), ..Default::default() };
        assert_eq!(Membership::new(bad).err(), Some(MembershipError::InvalidConfig(bad)));
        let zero = MembershipConfig { suspect_after: Duration::ZERO, ..Default::default() };
        assert!(Membership::new(zero).is_err());
    }

    #[test]
    fn regular_heartbeats_keep_a_member_alive() {
        let mut m = fresh();
        let k = joined_key(&m.join(MemberId(1), "10.0.0.1:4000", Role::Worker, t(0)));
        assert_eq!(k, MemberKey { id: MemberId(1), incarnation: 0 });
        for i in 1..=40 {
            assert_eq!(m.on_heartbeat(k, t(i * 500)), Ok(None));
            assert!(m.tick(t(i * 500 + 499)).is_empty());
        }
        assert_eq!(m.get(MemberId(1)).map(|x| x.health), Some(Health::Alive));
    }

    /// Silence: suspect after one missed interval, lost after 3 s, each reported once.
    #[test]
    fn silent_member_goes_suspect_then_lost() {
        let mut m = fresh();
        let k = joined_key(&m.join(MemberId(1), "a", Role::Worker, t(0)));
        let k2 = joined_key(&m.join(MemberId(2), "b", Role::Worker, t(0)));
        let mut events = Vec::new();
        for ms in (100..=4000).step_by(100) {
            m.on_heartbeat(k2, t(ms)).expect("member 2 beats");
            for e in m.tick(t(ms)) {
                events.push((ms, e));
            }
        }
        assert_eq!(
            events,
            vec![
                (600, Event::Suspect { key: k }),
                (3100, Event::Lost { key: k, role: Role::Worker })
            ]
        );
        assert_eq!(m.live(Some(Role::Worker)).map(|x| x.key).collect::<Vec<_>>(), vec![k2]);
        assert!(matches!(
            m.on_heartbeat(k, t(4100)),
            Err(MembershipError::StaleIncarnation { health: Health::Lost, .. })
        ));
    }

    #[test]
    fn suspect_member_recovers_on_heartbeat() {
        let mut m = fresh();
        let k = joined_key(&m.join(MemberId(3), "a", Role::DatasetShard, t(0)));
        assert_eq!(m.tick(t(800)), vec![Event::Suspect { key: k }]);
        assert_eq!(m.on_heartbeat(k, t(900)), Ok(Some(Event::Recovered { key: k })));
        assert!(m.tick(t(1300)).is_empty());
        assert_eq!(m.tick(t(1401)), vec![Event::Suspect { key: k }]);
    }

    #[test]
    fn a_late_tick_reports_lost_without_suspect() {
        let mut m = fresh();
        let k = joined_key(&m.join(MemberId(1), "a", Role::Worker, t(0)));
        assert_eq!(m.next_deadline(), Some(t(500)));
        assert_eq!(m.tick(t(10_000)), vec![Event::Lost { key: k, role: Role::Worker }]);
        assert!(m.tick(t(20_000)).is_empty());
        assert_eq!(m.next_deadline(), None);
    }

    /// A lost member that comes back gets a new incarnation; its old key stays dead.
    #[test]
    fn rejoin_after_loss_is_a_new_incarnation() {
        let mut m = fresh();
        let k0 = joined_key(&m.join(MemberId(5), "a:1", Role::Worker, t(0)));
        assert_eq!(m.tick(t(3001)), vec![Event::Lost { key: k0, role: Role::Worker }]);
        let ev = m.join(MemberId(5), "a:2", Role::Worker, t(3500));
        let k1 = MemberKey { id: MemberId(5), incarnation: 1 };
        assert_eq!(
            ev,
            vec![Event::Joined { key: k1, role: Role::Worker, address: "a:2".to_string() }]
        );
        assert_eq!(m.get(MemberId(5)).map(|x| x.address.as_str()), Some("a:2"));
        assert!(matches!(
            m.on_heartbeat(k0, t(3600)),
            Err(MembershipError::StaleIncarnation { .. })
        ));
        assert_eq!(m.on_heartbeat(k1, t(3600)), Ok(None));
    }

    /// A restarted process joining before it was detected as lost replaces the old incarnation, which
    /// is reported `Lost` so its work is re-queued.
    #[test]
    fn rejoin_while_alive_reports_the_old_incarnation_lost() {
        let mut m = fresh();
        let k0 = joined_key(&m.join(MemberId(2), "a", Role::Worker, t(0)));
        let ev = m.join(MemberId(2), "a", Role::Worker, t(200));
        assert_eq!(ev[0], Event::Lost { key: k0, role: Role::Worker });
        assert_eq!(joined_key(&ev).incarnation, 1);
        assert_eq!(m.live(None).count(), 1);
    }

    #[test]
    fn graceful_leave_and_errors() {
        let mut m = fresh();
        let k = joined_key(&m.join(MemberId(0), "c", Role::Coordinator, t(0)));
        assert_eq!(
            m.on_heartbeat(MemberKey { id: MemberId(9), incarnation: 0 }, t(1)),
            Err(MembershipError::UnknownMember(MemberId(9)))
        );
        assert_eq!(m.leave(k, t(100)), Ok(Event::Left { key: k, role: Role::Coordinator }));
        assert!(m.tick(t(60_000)).is_empty(), "a departed member is never reported lost");
        assert!(m.leave(k, t(200)).is_err());
        let k1 = joined_key(&m.join(MemberId(0), "c", Role::Coordinator, t(300)));
        assert_eq!(k1.incarnation, 1);
    }

    /// Membership events drive the scheduler: the lost worker's items are re-queued and the rejoined
    /// incarnation is a new worker that gets them.
    #[test]
    fn lost_event_requeues_scheduler_items() {
        use crate::scheduler::{ItemId, Scheduler};
        let mut m = fresh();
        let mut s: Scheduler<u32, u32, MemberKey> = Scheduler::new(0..4);
        let k0 = joined_key(&m.join(MemberId(1), "w", Role::Worker, t(0)));
        assert_eq!(s.next_for(&k0, t(0)).map(|a| a.id), Some(ItemId(0)));
        let mut requeued = Vec::new();
        for e in m.tick(t(3001)) {
            if let Event::Lost { key, role: Role::Worker } = e {
                requeued.extend(s.worker_lost(&key));
            }
        }
        assert_eq!(requeued, vec![ItemId(0)]);
        let k1 = joined_key(&m.join(MemberId(1), "w", Role::Worker, t(3100)));
        assert!(s.next_for(&k0, t(3100)).is_none());
        assert_eq!(s.next_for(&k1, t(3100)).map(|a| a.id), Some(ItemId(0)));
    }
}
