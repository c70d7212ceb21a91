//! The plan of a distributed sweep: which cells go out whole, and which are shared out in parts
//! because whole cells would leave workers idle.

use super::key::Keyed;
use super::store::SweepStore;
use crate::program::{eval_plan, EvalPlan};
use anyhow::Result;

/// A work item of a distributed sweep.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SweepItem {
    /// A whole cell: merge, evaluate, write its report into the store.
    Cell(usize),
    /// Part `part` of `parts` of a cell's evaluation (the worker merges the cell's model itself);
    /// the coordinator folds the parts and writes the report.
    Part {
        /// The cell's index.
        cell: usize,
        /// Which part.
        part: usize,
        /// Parts in all.
        parts: usize,
    },
}

/// A cell whose evaluation is shared out in parts.
#[derive(Debug, Clone)]
pub struct SharedCell {
    /// Its index in the sweep.
    pub cell: usize,
    /// Its evaluation plan, reporting into the sweep store.
    pub plan: EvalPlan,
    /// How many parts.
    pub parts: usize,
}

/// For `todo` cells and `workers` processes: the index (among the `todo`) of the first cell to
/// share out, and in how many parts. Whole cells keep every worker busy until fewer cells than
/// workers are left; those last `todo mod workers` (all, when `todo < workers`) are shared,
/// each in `⌈workers / shared⌉` parts. One part means nothing is shared.
pub fn share_out(todo: usize, workers: usize) -> (usize, usize) {
    let workers = workers.max(1);
    let tail = if todo < workers { todo } else { todo % workers };
    let parts = if tail == 0 { 1 } else { workers.div_ceil(tail) };
    (todo - tail, parts)
}

/// Of the cells without a result in `store`, the items for `workers` processes: whole cells
/// first (so every worker starts on one), then the parts of the shared cells ([`share_out`]);
/// a cell that saves its merged model or evaluates nothing always goes out whole. Returns the
/// items and the shared cells.
pub fn plan_sweep(
    cells: &[Keyed],
    store: &SweepStore,
    workers: usize,
) -> Result<(Vec<SweepItem>, Vec<SharedCell>)> {
    let mut todo = Vec::new();
    for (i, c) in cells.iter().enumerate() {
        if store.result(&c.key).is_some() {
            continue;
        }
        let mut cfg = c.cfg.clone();
        cfg.report_save_path = Some(store.report_path(&c.key).display().to_string());
        let shareable = cfg.merged_model_path().is_none();
        todo.push((i, if shareable { eval_plan(&cfg)? } else { None }));
    }
    let (first_shared, parts) = share_out(todo.len(), workers);
    let mut items = Vec::new();
    let mut shared = Vec::new();
    for (n, (i, plan)) in todo.into_iter().enumerate() {
        match plan {
            Some(plan) if parts > 1 && n >= first_shared => {
                shared.push(SharedCell { cell: i, plan, parts })
            }
            _ => items.push(SweepItem::Cell(i)),
        }
    }
    for s in &shared {
        let (cell, parts) = (s.cell, s.parts);
        items.extend((0..parts).map(|part| SweepItem::Part { cell, part, parts }));
    }
    Ok((items, shared))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compose_from_args;
    use crate::sweep::Cell;
    use std::path::PathBuf;

    #[test]
    fn only_cells_that_would_leave_workers_idle_are_shared() {
        // (todo, workers) -> (first shared, parts); parts == 1: nothing shared.
        assert_eq!(share_out(6, 3), (6, 1), "two rounds of whole cells, no one idles");
        assert_eq!(share_out(4, 3), (3, 3), "the fourth cell in three parts");
        assert_eq!(share_out(5, 3), (3, 2), "the last two cells in two parts each");
        assert_eq!(share_out(1, 3), (0, 3), "one cell, three workers");
        assert_eq!(share_out(2, 3), (0, 2));
        assert_eq!(share_out(7, 1), (7, 1), "a lone process never shares");
        assert_eq!(share_out(0, 4), (0, 1));
        assert_eq!(share_out(3, 0), (3, 1), "zero workers count as one");
    }

    fn keyed(cells: &[Cell]) -> Vec<Keyed> {
        let dirs = [PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")];
        cells
            .iter()
            .map(|c| {
                let cfg = compose_from_args(&c.args, &dirs).unwrap().program_config().unwrap();
                Keyed { cell: c.clone(), cfg, key: format!("key{}", c.index) }
            })
            .collect()
    }

    fn sweep(extra: &str) -> Vec<Cell> {
        let mut args: Vec<String> = [
            "method=task_arithmetic",
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
            "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.split_whitespace().map(str::to_string));
        crate::sweep::expand(&args).unwrap()
    }

    #[test]
    fn whole_cells_first_then_the_parts_of_the_last_ones() {
        let t = tempfile::tempdir().unwrap();
        let cells = sweep("method.scaling_factor=0.1,0.2,0.3,0.4");
        let store = SweepStore::open(t.path(), &cells).unwrap();
        let k = keyed(&cells);
        let (items, shared) = plan_sweep(&k, &store, 3).unwrap();
        let part = |part| SweepItem::Part { cell: 3, part, parts: 3 };
        assert_eq!(
            items,
            [SweepItem::Cell(0), SweepItem::Cell(1), SweepItem::Cell(2), part(0), part(1), part(2)]
        );
        assert_eq!(shared.len(), 1);
        let report = shared[0].plan.report_save_path.clone().unwrap();
        assert_eq!(report, store.report_path("key3"), "a shared cell reports into the store");
        // Cells with a result are skipped: three left for three workers, none shared.
        let p = store.report_path("key0");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "{\"average\": {}}").unwrap();
        let (items, shared) = plan_sweep(&k, &store, 3).unwrap();
        assert_eq!(items, [SweepItem::Cell(1), SweepItem::Cell(2), SweepItem::Cell(3)]);
        assert!(shared.is_empty());
        // One process: everything whole.
        let (items, _) = plan_sweep(&k, &store, 1).unwrap();
        assert!(items.iter().all(|i| matches!(i, SweepItem::Cell(_))));
    }

    #[test]
    fn cells_that_save_their_model_or_evaluate_nothing_go_out_whole() {
        let t = tempfile::tempdir().unwrap();
        let cells = sweep("method.scaling_factor=0.1,0.2 merged_model_save_path=/tmp/m");
        let store = SweepStore::open(t.path(), &cells).unwrap();
        let (items, shared) = plan_sweep(&keyed(&cells), &store, 4).unwrap();
        assert_eq!(items, [SweepItem::Cell(0), SweepItem::Cell(1)]);
        assert!(shared.is_empty());
        let cells = sweep("method.scaling_factor=0.1,0.2 taskpool=dummy");
        let t = tempfile::tempdir().unwrap();
        let store = SweepStore::open(t.path(), &cells).unwrap();
        let (items, shared) = plan_sweep(&keyed(&cells), &store, 4).unwrap();
        assert_eq!((items.len(), shared.len()), (2, 0));
    }
}
