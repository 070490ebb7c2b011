//! Queue-depth autoscaling as a pure function.
//!
//! [`decide`] maps what the operator observes (waiting and running jobs, busy workers, the
//! Deployment's current replicas), the pool's policy, a short history of earlier
//! recommendations and the current time to the replicas the worker Deployment should have.
//!
//! Rules:
//! - demand is `ceil((waiting + running) / jobsPerReplica)`, clamped into `[min, max]`;
//! - more demand than replicas scales up at once;
//! - less demand scales down only when every recommendation of the last
//!   `scaleDownDelaySeconds` was that low (a stabilisation window, as the HPA's): a queue that
//!   drains and refills within the window never makes the pool oscillate, and the pool reaches
//!   zero only after it was idle that long;
//! - never below the number of busy workers: a scale-down never asks for fewer pods than are
//!   processing a job (the pods to remove are picked by `pod-deletion-cost`, idle ones first);
//! - no scale-down at all while a busy worker's pod is not Ready: the ReplicaSet controller
//!   removes not-ready pods before it reads `pod-deletion-cost`, so it would take exactly that
//!   busy pod (a worker whose probe fails while it runs: a Redis outage, a stalled node). The
//!   scale-down waits until the pod is Ready again or its job has moved on.

use std::collections::VecDeque;

use jiff::{SignedDuration, Timestamp};

/// The pool's scaling policy (from `InpaintPool.spec`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Jobs (waiting + running) one worker is sized for; 0 is treated as 1.
    pub jobs_per_replica: u32,
    pub scale_down_delay: SignedDuration,
}

impl Policy {
    pub fn from_spec(spec: &pawfect_api::InpaintPoolSpec) -> Self {
        Policy {
            min_replicas: spec.min_replicas,
            max_replicas: spec.max_replicas,
            jobs_per_replica: spec.jobs_per_replica,
            scale_down_delay: SignedDuration::from_secs(
                i64::try_from(spec.scale_down_delay_seconds).unwrap_or(i64::MAX),
            ),
        }
    }
}

/// What the operator sees at one poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// Jobs in the queue that no worker claimed yet.
    pub waiting: u64,
    /// Jobs claimed and not finished.
    pub running: u64,
    /// Workers processing a job right now.
    pub busy_workers: u32,
    /// Of those, the ones whose pod is not Ready.
    pub busy_not_ready: u32,
    /// `spec.replicas` of the worker Deployment (0 when it does not exist yet).
    pub current_replicas: u32,
}

/// Recent recommendations of one pool, kept as a sliding-window maximum.
///
/// Only recommendations that can still be the maximum of the window are kept (each entry is
/// larger than every later one), so the memory stays bounded by the number of distinct values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    samples: VecDeque<(Timestamp, u32)>,
}

impl History {
    /// History for a pool seen for the first time (e.g. after an operator restart): the current
    /// replicas count as a recommendation made now, so a restart never triggers an early scale-down.
    pub fn seeded(now: Timestamp, current_replicas: u32) -> Self {
        let mut h = History::default();
        h.push(now, current_replicas);
        h
    }

    fn push(&mut self, at: Timestamp, value: u32) {
        while self.samples.back().is_some_and(|&(_, v)| v <= value) {
            self.samples.pop_back();
        }
        self.samples.push_back((at, value));
    }

    /// Drops samples at or before `cutoff`.
    fn prune(&mut self, cutoff: Timestamp) {
        while self.samples.front().is_some_and(|&(t, _)| t <= cutoff) {
            self.samples.pop_front();
        }
    }

    fn max(&self) -> Option<(Timestamp, u32)> {
        self.samples.front().copied()
    }
}

/// Why the decision is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Demand equals the current replicas.
    Steady,
    /// Demand rose above the current replicas.
    ScaleUp,
    /// Demand stayed lower for the whole delay.
    ScaleDown,
    /// Demand is lower, but not yet for the whole delay; `until` is when it may go down.
    ScaleDownDelayed { until: Timestamp },
    /// Demand is lower, but a busy worker's pod is not Ready (it would be removed first).
    ScaleDownHeld,
}

/// The autoscaler's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Replicas the Deployment should have.
    pub desired: u32,
    /// What the demand alone asks for now (clamped, busy floor applied).
    pub recommended: u32,
    pub reason: Reason,
}

/// Replicas the demand alone asks for: `ceil((waiting + running) / jobsPerReplica)` within
/// `[min, max]`, never below the busy workers.
pub fn recommend(policy: &Policy, obs: &Observation) -> u32 {
    let per = u64::from(policy.jobs_per_replica.max(1));
    let demand = obs.waiting.saturating_add(obs.running).div_ceil(per);
    let demand = u32::try_from(demand).unwrap_or(u32::MAX);
    let max = policy.max_replicas.max(policy.min_replicas);
    demand.clamp(policy.min_replicas, max).max(obs.busy_workers)
}

/// Decides the replicas of a pool and records this poll's recommendation in `history`.
pub fn decide(
    policy: &Policy,
    obs: &Observation,
    history: &mut History,
    now: Timestamp,
) -> Decision {
    let recommended = recommend(policy, obs);
    history.prune(now - policy.scale_down_delay);
    history.push(now, recommended);
    let current = obs.current_replicas;
    if recommended >= current {
        let reason = if recommended == current {
            Reason::Steady
        } else {
            Reason::ScaleUp
        };
        return Decision {
            desired: recommended,
            recommended,
            reason,
        };
    }
    // Lower demand: the highest recommendation within the delay window wins, which is the
    // current replicas or less. A lowered maxReplicas applies at once (busy floor kept).
    let (since, window_max) = history.max().unwrap_or((now, recommended));
    let cap = policy
        .max_replicas
        .max(policy.min_replicas)
        .max(obs.busy_workers);
    let desired = window_max.min(current).min(cap).max(recommended);
    if desired < current && obs.busy_not_ready > 0 {
        return Decision {
            desired: current,
            recommended,
            reason: Reason::ScaleDownHeld,
        };
    }
    let reason = if desired == current {
        Reason::ScaleDownDelayed {
            until: since + policy.scale_down_delay,
        }
    } else {
        Reason::ScaleDown
    };
    Decision {
        desired,
        recommended,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn policy(min: u32, max: u32, per: u32, delay: i64) -> Policy {
        Policy {
            min_replicas: min,
            max_replicas: max,
            jobs_per_replica: per,
            scale_down_delay: SignedDuration::from_secs(delay),
        }
    }

    /// One poll of a scenario: time, waiting, running, busy, and the expected desired replicas.
    /// The Deployment's replicas follow the previous decision, as the operator applies it.
    struct Step(i64, u64, u64, u32, u32);

    fn run(policy: Policy, start_replicas: u32, steps: &[Step]) -> Vec<Decision> {
        let mut history = History::seeded(t(steps[0].0), start_replicas);
        let mut current = start_replicas;
        let mut out = Vec::new();
        for (i, Step(at, waiting, running, busy, want)) in steps.iter().enumerate() {
            let obs = Observation {
                waiting: *waiting,
                running: *running,
                busy_workers: *busy,
                busy_not_ready: 0,
                current_replicas: current,
            };
            let d = decide(&policy, &obs, &mut history, t(*at));
            assert_eq!(
                d.desired, *want,
                "step {i} (t={at}, waiting={waiting}, running={running}, busy={busy}, current={current}): {d:?}"
            );
            current = d.desired;
            out.push(d);
        }
        out
    }

    #[test]
    fn burst_scales_up_at_once_to_ceil_demand() {
        let p = policy(0, 10, 1, 300);
        let d = run(
            p,
            0,
            &[
                Step(0, 0, 0, 0, 0),
                Step(10, 7, 0, 0, 7),
                Step(20, 5, 2, 2, 7),
            ],
        );
        assert_eq!(d[1].reason, Reason::ScaleUp);
        assert_eq!(d[2].reason, Reason::Steady);
        // jobsPerReplica rounds up.
        let p = policy(0, 10, 4, 300);
        run(
            p,
            0,
            &[
                Step(0, 9, 0, 0, 3),
                Step(5, 8, 0, 0, 3),
                Step(6, 13, 0, 0, 4),
            ],
        );
    }

    #[test]
    fn burst_is_capped_by_max_and_min_is_kept() {
        let p = policy(2, 5, 1, 60);
        run(
            p,
            0,
            &[
                Step(0, 0, 0, 0, 2),
                Step(10, 100, 0, 0, 5),
                Step(20, 0, 0, 0, 5),
                // The last recommendation of 5 was at t=10: it leaves the 60 s window at t=70.
                Step(69, 0, 0, 0, 5),
                Step(70, 0, 0, 0, 2),
            ],
        );
    }

    #[test]
    fn drain_scales_down_only_after_the_delay() {
        let p = policy(0, 10, 1, 300);
        let d = run(
            p,
            0,
            &[
                Step(0, 6, 0, 0, 6),
                Step(10, 0, 6, 6, 6),
                Step(100, 0, 3, 3, 6),
                Step(200, 0, 1, 1, 6),
                // 300 s after the last 6 (t=10): the highest recommendation left is 3 (t=100).
                Step(311, 0, 1, 1, 3),
                Step(401, 0, 0, 0, 1),
                Step(610, 0, 0, 0, 1),
                Step(611, 0, 0, 0, 0),
            ],
        );
        assert_eq!(d[2].reason, Reason::ScaleDownDelayed { until: t(310) });
        assert_eq!(d[4].reason, Reason::ScaleDown);
    }

    #[test]
    fn scales_to_zero_only_after_idle_for_the_delay() {
        let p = policy(0, 4, 1, 120);
        let d = run(
            p,
            1,
            &[
                Step(0, 0, 1, 1, 1),
                Step(30, 0, 0, 0, 1),
                Step(119, 0, 0, 0, 1),
                Step(120, 0, 0, 0, 0),
                Step(130, 0, 0, 0, 0),
            ],
        );
        assert_eq!(d[1].reason, Reason::ScaleDownDelayed { until: t(120) });
        assert_eq!(d[4].reason, Reason::Steady);
        // With minReplicas 1 it stops at one.
        run(
            policy(1, 4, 1, 10),
            3,
            &[Step(0, 0, 0, 0, 3), Step(11, 0, 0, 0, 1)],
        );
    }

    #[test]
    fn never_below_busy_workers() {
        // maxReplicas lowered below the busy workers: keep the busy ones, drop the idle one now.
        let p = policy(0, 2, 1, 300);
        let d = run(p, 5, &[Step(0, 0, 4, 4, 4), Step(10, 0, 3, 3, 3)]);
        assert_eq!(d[0].reason, Reason::ScaleDown);
        // A worker still busy (running count stale or lagging) keeps its pod even at zero demand.
        let p = policy(0, 10, 1, 0);
        run(
            p,
            3,
            &[
                Step(0, 0, 0, 2, 2),
                Step(1, 0, 0, 1, 1),
                Step(2, 0, 0, 0, 0),
            ],
        );
        // Many jobs per replica, but every busy worker keeps its pod.
        let p = policy(0, 10, 8, 0);
        run(p, 4, &[Step(0, 0, 4, 4, 4), Step(1, 0, 2, 2, 2)]);
    }

    #[test]
    fn no_scale_down_while_a_busy_worker_is_not_ready() {
        // Three pods, one job left on a worker whose probe fails: the ReplicaSet controller
        // would remove that not-ready pod first, so nothing goes until it is Ready again.
        let p = policy(0, 3, 1, 0);
        let mut history = History::seeded(t(0), 3);
        let obs = |busy_not_ready| Observation {
            waiting: 0,
            running: 1,
            busy_workers: 1,
            busy_not_ready,
            current_replicas: 3,
        };
        let held = decide(&p, &obs(1), &mut history, t(1));
        assert_eq!((held.desired, held.reason), (3, Reason::ScaleDownHeld));
        assert_eq!(held.recommended, 1);
        let down = decide(&p, &obs(0), &mut history, t(2));
        assert_eq!((down.desired, down.reason), (1, Reason::ScaleDown));
        // Scaling up is never held.
        let up = decide(
            &p,
            &Observation {
                waiting: 3,
                ..obs(1)
            },
            &mut history,
            t(3),
        );
        assert_eq!((up.desired, up.reason), (3, Reason::Steady));
    }

    #[test]
    fn flapping_demand_does_not_oscillate() {
        let p = policy(0, 8, 1, 60);
        let steps: Vec<Step> = (0..30)
            .map(|i| {
                let waiting = if i % 2 == 0 { 4 } else { 0 };
                Step(i * 10, waiting, 0, 0, 4)
            })
            .collect();
        let d = run(p, 0, &steps);
        let changes = d
            .windows(2)
            .filter(|w| w[0].desired != w[1].desired)
            .count();
        assert_eq!(changes, 0, "replicas changed while demand flapped");
        // Once the flapping stops the pool settles after one delay.
        let mut history = History::seeded(t(0), 4);
        for (i, s) in steps.iter().enumerate() {
            let obs = Observation {
                waiting: s.1,
                running: 0,
                busy_workers: 0,
                busy_not_ready: 0,
                current_replicas: 4,
            };
            let _ = decide(&p, &obs, &mut history, t(s.0));
            assert!(history.samples.len() <= 2, "history grows at step {i}");
        }
        let idle = Observation {
            waiting: 0,
            running: 0,
            busy_workers: 0,
            busy_not_ready: 0,
            current_replicas: 4,
        };
        // The last recommendation of 4 was at t=280.
        assert_eq!(decide(&p, &idle, &mut history, t(339)).desired, 4);
        assert_eq!(decide(&p, &idle, &mut history, t(340)).desired, 0);
    }

    #[test]
    fn restart_does_not_scale_down_early() {
        // An operator that restarts sees 5 replicas and an empty queue: it waits a full delay.
        let p = policy(0, 10, 1, 100);
        run(
            p,
            5,
            &[
                Step(0, 0, 0, 0, 5),
                Step(99, 0, 0, 0, 5),
                Step(101, 0, 0, 0, 0),
            ],
        );
    }

    #[test]
    fn inconsistent_bounds_and_zero_jobs_per_replica_are_safe() {
        // min > max (the CRD rejects it, but the function must not panic): min wins.
        assert_eq!(
            recommend(
                &policy(3, 1, 0, 0),
                &Observation {
                    waiting: 10,
                    running: 0,
                    busy_workers: 0,
                    busy_not_ready: 0,
                    current_replicas: 0
                }
            ),
            3
        );
        assert_eq!(
            recommend(
                &policy(0, 1000, 0, 0),
                &Observation {
                    waiting: u64::MAX,
                    running: u64::MAX,
                    busy_workers: 0,
                    busy_not_ready: 0,
                    current_replicas: 0
                }
            ),
            1000
        );
    }
}
