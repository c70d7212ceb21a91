//! Slurm: who am I in this job, and where is rank 0.
//!
//! Read from the variables `srun` sets for every task (`SLURM_PROCID`, `SLURM_NTASKS`,
//! `SLURM_NODEID`, `SLURM_LOCALID`, `SLURM_JOB_ID`, `SLURM_STEP_NODELIST` or
//! `SLURM_JOB_NODELIST`). Rank 0 hosts the coordinator on the first node of the node list; the
//! others join it there. The port is derived from the job id, so tasks agree on it without
//! talking, and two jobs sharing a node (or simulated nodes sharing one host) do not collide.

use std::collections::HashMap;

/// Errors of Slurm discovery, naming the variable or node list at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlurmError {
    /// A node list that is not Slurm's hostlist syntax.
    #[error("cannot parse the Slurm node list `{list}`: {reason}")]
    NodeList {
        /// The list as given.
        list: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A variable `srun` always sets is missing or not a number.
    #[error("Slurm variable {name}: {reason}")]
    Variable {
        /// The variable.
        name: String,
        /// Missing, or the bad value.
        reason: String,
    },
}

/// Expands a Slurm hostlist (`n[1-3],gpu01`, `node[01-04,07]`, `r[1-2]n[1-2]`) into host names in
/// order, keeping zero padding.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, SlurmError> {
    let err = |reason: &str| SlurmError::NodeList { list: list.to_string(), reason: reason.into() };
    let mut out = Vec::new();
    for item in split_top_level(list).map_err(|r| err(&r))? {
        if item.is_empty() {
            return Err(err("an empty host name"));
        }
        let mut names = vec![String::new()];
        let mut rest = item.as_str();
        while !rest.is_empty() {
            match rest.find('[') {
                None => {
                    if rest.contains(']') {
                        return Err(err("a `]` without `[`"));
                    }
                    names.iter_mut().for_each(|n| n.push_str(rest));
                    rest = "";
                }
                Some(open) => {
                    let prefix = &rest[..open];
                    if prefix.contains(']') {
                        return Err(err("a `]` without `[`"));
                    }
                    let close =
                        rest[open..].find(']').ok_or_else(|| err("a `[` without `]`"))? + open;
                    let suffixes = expand_range_set(&rest[open + 1..close]).map_err(|r| err(&r))?;
                    names = names
                        .iter()
                        .flat_map(|n| suffixes.iter().map(move |s| format!("{n}{prefix}{s}")))
                        .collect();
                    rest = &rest[close + 1..];
                }
            }
        }
        out.extend(names);
    }
    if out.is_empty() {
        return Err(err("no hosts"));
    }
    Ok(out)
}

/// Splits at commas outside brackets.
fn split_top_level(list: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut cur = String::new();
    for c in list.trim().chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err("unbalanced or nested brackets".into());
        }
        if c == ',' && depth == 0 {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    if depth != 0 {
        return Err("a `[` without `]`".into());
    }
    out.push(cur);
    Ok(out)
}

/// `01-04,07` → `01 02 03 04 07`.
fn expand_range_set(set: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in set.split(',') {
        let part = part.trim();
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
        if !digits(a) || !digits(b) {
            return Err(format!("`{part}` is not a number or a range of numbers"));
        }
        let (lo, hi): (u64, u64) = (
            a.parse().map_err(|_| format!("`{a}` is too large"))?,
            b.parse().map_err(|_| format!("`{b}` is too large"))?,
        );
        if hi < lo {
            return Err(format!("the range `{part}` goes backwards"));
        }
        if hi - lo >= 100_000 {
            return Err(format!("the range `{part}` is implausibly large"));
        }
        let width = if a.len() > 1 && a.starts_with('0') { a.len() } else { 0 };
        out.extend((lo..=hi).map(|i| format!("{i:0width$}")));
    }
    Ok(out)
}

/// This task's place in a Slurm job step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmTask {
    /// `SLURM_JOB_ID`.
    pub job_id: u64,
    /// `SLURM_PROCID`: the global rank.
    pub rank: usize,
    /// `SLURM_NTASKS`: the number of ranks.
    pub world_size: usize,
    /// `SLURM_NODEID`: index of this node in the node list.
    pub node_index: usize,
    /// `SLURM_LOCALID`: rank on this node (selects the GPU).
    pub local_rank: usize,
    /// The step's nodes, expanded.
    pub nodes: Vec<String>,
}

impl SlurmTask {
    /// Reads the task from environment variables; `Ok(None)` outside Slurm (no `SLURM_PROCID`).
    pub fn from_env() -> Result<Option<Self>, SlurmError> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// [`from_env`](Self::from_env) over an explicit variable map.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Option<Self>, SlurmError> {
        if !vars.contains_key("SLURM_PROCID") {
            return Ok(None);
        }
        let num = |name: &str| -> Result<u64, SlurmError> {
            let v = vars.get(name).ok_or_else(|| SlurmError::Variable {
                name: name.into(),
                reason: "is not set".into(),
            })?;
            v.trim().parse().map_err(|_| SlurmError::Variable {
                name: name.into(),
                reason: format!("`{v}` is not a number"),
            })
        };
        let list = vars
            .get("SLURM_STEP_NODELIST")
            .or_else(|| vars.get("SLURM_JOB_NODELIST"))
            .or_else(|| vars.get("SLURM_NODELIST"))
            .ok_or_else(|| SlurmError::Variable {
                name: "SLURM_JOB_NODELIST".into(),
                reason: "is not set".into(),
            })?;
        let task = Self {
            job_id: num("SLURM_JOB_ID")?,
            rank: num("SLURM_PROCID")? as usize,
            world_size: num("SLURM_NTASKS")? as usize,
            node_index: vars.get("SLURM_NODEID").map_or(Ok(0), |_| num("SLURM_NODEID"))? as usize,
            local_rank: vars.get("SLURM_LOCALID").map_or(Ok(0), |_| num("SLURM_LOCALID"))? as usize,
            nodes: expand_nodelist(list)?,
        };
        if task.rank >= task.world_size {
            return Err(SlurmError::Variable {
                name: "SLURM_PROCID".into(),
                reason: format!("{} is not below SLURM_NTASKS={}", task.rank, task.world_size),
            });
        }
        Ok(Some(task))
    }

    /// The coordinator's host: the first node of the step.
    pub fn coordinator_host(&self) -> &str {
        &self.nodes[0]
    }

    /// The coordinator's port, derived from the job id (in 20000..60000).
    pub fn coordinator_port(&self) -> u16 {
        20_000 + (self.job_id % 40_000) as u16
    }

    /// Whether this task hosts the coordinator.
    pub fn is_coordinator(&self) -> bool {
        self.rank == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_ranges_lists_padding_and_products() {
        assert_eq!(expand_nodelist("n[1-3],gpu01").unwrap(), ["n1", "n2", "n3", "gpu01"]);
        assert_eq!(
            expand_nodelist("node[01-03,07]").unwrap(),
            ["node01", "node02", "node03", "node07"]
        );
        assert_eq!(expand_nodelist("solo").unwrap(), ["solo"]);
        assert_eq!(expand_nodelist("r[1-2]n[8-9]").unwrap(), ["r1n8", "r1n9", "r2n8", "r2n9"]);
        assert_eq!(expand_nodelist("a[9-11]-ib").unwrap(), ["a9-ib", "a10-ib", "a11-ib"]);
        assert_eq!(expand_nodelist("x[098-101]").unwrap(), ["x098", "x099", "x100", "x101"]);
    }

    #[test]
    fn refuses_malformed_lists_naming_them() {
        for bad in ["n[1-3", "n1-3]", "n[3-1]", "n[a-b]", "n[[1]]", "", "a,,b", "n[1-999999]"] {
            let e = expand_nodelist(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")), "{bad}: {e}");
        }
    }

    #[test]
    fn reads_the_task_from_srun_variables() {
        let vars = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert_eq!(SlurmTask::from_vars(&vars(&[])).unwrap(), None);
        let t = SlurmTask::from_vars(&vars(&[
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "3"),
            ("SLURM_NODEID", "2"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_JOB_ID", "4242"),
            ("SLURM_JOB_NODELIST", "n[1-3]"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((t.rank, t.world_size, t.node_index, t.local_rank), (2, 3, 2, 0));
        assert_eq!(t.coordinator_host(), "n1");
        assert_eq!(t.coordinator_port(), 24242);
        assert!(!t.is_coordinator());
        let e = SlurmTask::from_vars(&vars(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "x"),
            ("SLURM_JOB_ID", "1"),
            ("SLURM_JOB_NODELIST", "n1"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("SLURM_NTASKS"), "{e}");
    }
}
