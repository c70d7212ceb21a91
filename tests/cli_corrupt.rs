//! End to end: `fusion_bench corrupt` on a copy of the fixture hub cache (never the fixtures
//! themselves): it writes a split that `split: NAME` then evaluates, deterministically for any
//! thread count, and refuses bad input by name without leaving anything half-written.

use std::path::{Path, PathBuf};

mod common;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A copy of the fixture hub cache (only the datasets, and the models when `models`).
fn hf_home(tmp: &Path, models: bool) -> PathBuf {
    let home = tmp.join("hf_home");
    let src = root().join("tests/fixtures/hf_home/hub");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("datasets--") || models {
            common::copy_dir(&p, &home.join("hub").join(name));
        }
    }
    home
}

fn run(hf_home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fusion_bench"))
        .args(args)
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env("RUST_LOG", "warn")
        .current_dir(root())
        .output()
        .expect("the binary runs")
}

fn snapshot(hf_home: &Path, repo: &str) -> PathBuf {
    let dir = hf_home.join("hub").join(format!("datasets--{}", repo.replace('/', "--")));
    let rev = std::fs::read_to_string(dir.join("refs/main")).unwrap();
    dir.join("snapshots").join(rev.trim())
}

/// Every file under `dir` with its bytes, sorted: what a failed command must leave unchanged.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(tree(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_the_command() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(tmp.path(), &["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("corrupt") && text.contains("--severity"),
        "{text}"
    );
    let out = run(tmp.path(), &["corrupt", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in
        ["--dataset", "--split", "--corruption", "--params", "--seed", "--threads", "--grid"]
    {
        assert!(text.contains(flag), "corrupt --help lacks {flag}: {text}");
    }
}

/// The eight tasks of the TA8 task pool and their datasets.
const TA8: [(&str, &str); 8] = [
    ("sun397", "tanganke/sun397"),
    ("stanford-cars", "tanganke/stanford_cars"),
    ("resisc45", "tanganke/resisc45"),
    ("eurosat", "tanganke/eurosat"),
    ("svhn", "ufldl-stanford/svhn"),
    ("gtsrb", "tanganke/gtsrb"),
    ("mnist", "ylecun/mnist"),
    ("dtd", "tanganke/dtd"),
];

fn dummy_eval(hf_home: &Path, split: &str, report: &Path) -> serde_json::Value {
    eval_splits(hf_home, &[("dtd", split)], report)
}

/// The TA8 evaluation of the dtd model with `splits` (task, split) instead of `test`.
fn eval_splits(hf_home: &Path, splits: &[(&str, &str)], report: &Path) -> serde_json::Value {
    let mut args: Vec<String> = [
        "method=dummy",
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_individual",
        "modelpool.models._pretrained_=tanganke/clip-vit-base-patch32_dtd",
        "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
        "fabric.accelerator=cpu",
        "print_config=false",
    ]
    .map(String::from)
    .to_vec();
    args.extend(splits.iter().map(|(t, s)| format!("taskpool.test_datasets.{t}.split={s}")));
    args.push(format!("report_save_path={}", report.display()));
    let split = format!("{splits:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_fusion_bench"))
        .args(&args)
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env("RUST_LOG", "warn")
        .env("FUSION_BENCH_IMAGE_CACHE_GB", "0")
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success(), "eval on split {split}: {}", stderr(&out));
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

/// DTD, which FusionBench never published corrupted: each of the seven corruptions becomes a
/// split the evaluation reads with `taskpool.test_datasets.dtd.split=NAME`, with the clean
/// split's labels and a different loss.
#[test]
fn corrupted_dtd_split_evaluates_and_differs_from_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let home = hf_home(tmp.path(), true);
    let clean = dummy_eval(&home, "test", &tmp.path().join("clean.json"));
    for (c, name) in [("gaussian_noise", "noisy5"), ("pixelate", "pixelate")] {
        let out = run(
            &home,
            &[
                "corrupt",
                "--dataset",
                "tanganke/dtd",
                "--split",
                "test",
                "--corruption",
                c,
                "--severity",
                "5",
                "--name",
                name,
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let rep = dummy_eval(&home, name, &tmp.path().join(format!("{name}.json")));
        let (a, b) = (&clean["dtd"], &rep["dtd"]);
        assert_ne!(a["loss"], b["loss"], "{c}: loss unchanged: {a} {b}");
        // The other tasks read their clean splits: unchanged.
        assert_eq!(clean["eurosat"], rep["eurosat"]);
    }
    let card = std::fs::read_to_string(snapshot(&home, "tanganke/dtd").join("README.md")).unwrap();
    assert!(card.contains("- split: noisy5\n    path: data/noisy5-*"), "{card}");
    assert!(card.contains("name: noisy5") && card.contains("num_examples: 64"), "{card}");
    // Labels are the clean split's, images all PNG.
    let data = snapshot(&home, "tanganke/dtd").join("data");
    let clean_rows =
        fusion_bench::data::parquet::read_rows(&data.join("test-00000-of-00001.parquet")).unwrap();
    let rows = fusion_bench::data::parquet::read_rows(&data.join("noisy5-00000-of-00001.parquet"))
        .unwrap();
    assert_eq!(
        rows.iter().map(|r| r.label).collect::<Vec<_>>(),
        clean_rows.iter().map(|r| r.label).collect::<Vec<_>>()
    );
    assert!(rows.iter().all(|r| r.bytes.starts_with(b"\x89PNG")));
    // Every task of the eight, not only FusionBench's four: a corrupted split of each, read
    // by one evaluation, changes each task's loss.
    for (_, repo) in TA8 {
        let args = ["corrupt", "--dataset", repo, "--corruption", "contrast", "--name", "c3"];
        let out = run(&home, &args);
        assert!(out.status.success(), "{repo}: {}", stderr(&out));
    }
    let splits: Vec<(&str, &str)> = TA8.iter().map(|(t, _)| (*t, "c3")).collect();
    let rep = eval_splits(&home, &splits, &tmp.path().join("c3.json"));
    for (task, _) in TA8 {
        assert_ne!(clean[task]["loss"], rep[task]["loss"], "{task}: {} {}", clean[task], rep[task]);
    }
}

#[test]
fn same_seed_same_bytes_for_any_thread_count_and_a_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let home = hf_home(tmp.path(), false);
    let data = snapshot(&home, "tanganke/eurosat").join("data");
    let mut written = Vec::new();
    for (name, threads, seed) in [("n1", "1", "7"), ("n2", "2", "7"), ("n3", "2", "8")] {
        let out = run(
            &home,
            &[
                "corrupt",
                "--dataset",
                "tanganke/eurosat",
                "--corruption",
                "spatter",
                "--params",
                "imagenetc",
                "--seed",
                seed,
                "--threads",
                threads,
                "--name",
                name,
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let rows = fusion_bench::data::parquet::read_rows(
            &data.join(format!("{name}-00000-of-00001.parquet")),
        )
        .unwrap();
        written.push(rows.into_iter().map(|r| r.bytes).collect::<Vec<_>>());
    }
    assert_eq!(written[0], written[1], "--threads changed the bytes");
    assert_ne!(written[0], written[2], "--seed did not change the bytes");
    // Rewriting needs --overwrite; the source split cannot be the target.
    let args =
        ["corrupt", "--dataset", "tanganke/eurosat", "--corruption", "contrast", "--name", "n1"];
    let out = run(&home, &args);
    assert!(
        !out.status.success() && stderr(&out).contains("already has a split `n1`"),
        "{}",
        stderr(&out)
    );
    let out = run(&home, &[&args[..], &["--overwrite"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(
        &home,
        &["corrupt", "--dataset", "tanganke/eurosat", "--corruption", "contrast", "--name", "test"],
    );
    assert!(!out.status.success() && stderr(&out).contains("test"), "{}", stderr(&out));
    // The grid: a PNG of the clean image and 5 severities per corruption.
    let grid = tmp.path().join("grid.png");
    let out = run(
        &home,
        &["corrupt", "--dataset", "tanganke/dtd", "--grid", grid.to_str().unwrap(), "--index", "3"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let img = image::open(&grid).unwrap();
    assert!(img.width() > 6 * 96 && img.height() > 7 * 96, "{}x{}", img.width(), img.height());
}

/// Writes `rows` (bytes, label) as the only test file of `repo` in the copy.
fn replace_test_split(home: &Path, repo: &str, rows: &[(Vec<u8>, i64)]) {
    write_parquet(&snapshot(home, repo).join("data/test-00000-of-00001.parquet"), rows, None);
}

/// Writes `rows` (bytes, label) as an image-classification parquet file, in row groups of at
/// most `row_group` rows when given.
fn write_parquet(path: &Path, rows: &[(Vec<u8>, i64)], row_group: Option<usize>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    fusion_bench::data::parquet::write_image_rows(path, rows, row_group).unwrap();
}

/// A local dataset folder larger than the fixtures: `rows` PNG images of 192×192 over two
/// files of `data/` in row groups of 30 (so chunks cross files and row groups).
fn large_dataset(dir: &Path, rows: usize) -> PathBuf {
    let images: Vec<(Vec<u8>, i64)> = (0..rows)
        .map(|i| {
            let img = image::RgbImage::from_fn(192, 192, |x, y| {
                let v = (x * 3 + y * 5 + i as u32 * 7) % 256;
                image::Rgb([v as u8, (255 - v) as u8, ((x ^ y) + i as u32) as u8])
            });
            let mut out = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
            (out, (i % 10) as i64)
        })
        .collect();
    let half = rows * 3 / 5;
    write_parquet(&dir.join("data/test-00000-of-00002.parquet"), &images[..half], Some(30));
    write_parquet(&dir.join("data/test-00001-of-00002.parquet"), &images[half..], Some(30));
    dir.to_path_buf()
}

/// The corrupt line of the cluster tests on dataset folder `data`, writing split `name`.
fn cluster_line(data: &Path, name: &str) -> Vec<String> {
    let mut a: Vec<String> = ["corrupt", "--dataset"].map(String::from).to_vec();
    a.push(data.display().to_string());
    a.extend(
        [
            "--corruption",
            "spatter",
            "--params",
            "imagenetc",
            "--seed",
            "5",
            "--threads",
            "1",
            "--chunk-rows",
            "4",
            "--name",
            name,
        ]
        .map(String::from),
    );
    a
}

fn corrupt_command(hf_home: &Path, args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fusion_bench"));
    c.args(args)
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env("FUSION_BENCH_FAST_TIMEOUTS", "1")
        .env("RUST_BACKTRACE", "0")
        .current_dir(hf_home.parent().unwrap());
    c
}

/// A large split shared by a coordinator and two workers (each process one thread, chunks of
/// 4 rows) is byte for byte the split one process writes, also when a worker is killed
/// (SIGKILL) once it has corrupted a chunk: its chunks go to the others.
#[test]
fn a_cluster_writes_the_single_process_split_also_with_a_worker_killed() {
    use common::cluster::Coordinator;
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf_home");
    std::fs::create_dir_all(&home).unwrap();
    let data = large_dataset(&tmp.path().join("big"), 150);
    let one = corrupt_command(&home, &cluster_line(&data, "one")).output().unwrap();
    assert!(one.status.success(), "{}", stderr(&one));
    let single = std::fs::read(data.join("data/one-00000-of-00001.parquet")).unwrap();
    for (name, kill) in [("two", false), ("three", true)] {
        let job = tmp.path().join(format!("job-{name}"));
        let launch = |extra: &[&str]| {
            let mut a = cluster_line(&data, name);
            a.extend(["--job-dir".to_string(), job.display().to_string()]);
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        let coordinator =
            corrupt_command(&home, &launch(&["--serve", "127.0.0.1:0", "--min-workers", "2"]));
        let (coord, addr) = Coordinator::spawn(coordinator);
        let logs: Vec<PathBuf> =
            (0..2).map(|i| tmp.path().join(format!("{name}-w{i}.log"))).collect();
        let mut workers: Vec<_> = (0..2)
            .map(|i| {
                let node = format!("w{i}");
                let mut c =
                    corrupt_command(&home, &launch(&["--join", &addr, "--node-name", &node]));
                let log = std::fs::File::create(&logs[i]).unwrap();
                c.env("RUST_LOG", "info,fusion_bench::corrupt=debug")
                    .stdout(std::process::Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap()
            })
            .collect();
        if kill {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while !std::fs::read_to_string(&logs[0]).unwrap_or_default().contains("chunk done") {
                assert!(std::time::Instant::now() < deadline, "worker 0 did no chunk");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            workers[0].kill().unwrap();
        }
        let (status, log) = coord.wait();
        assert!(status.success(), "coordinator: {status}\n{log}");
        for (i, w) in workers.iter_mut().enumerate() {
            let s = w.wait().unwrap();
            let wlog = std::fs::read_to_string(&logs[i]).unwrap_or_default();
            if kill && i == 0 {
                continue;
            }
            assert!(s.success(), "worker {i}: {s}\n{wlog}");
            let items = common::cluster::worker_items(&wlog, "corrupt: worker done");
            assert!(items.is_some_and(|n| n > 0), "worker {i} corrupted no chunk:\n{wlog}");
        }
        let done = log.lines().find(|l| l.contains("chunks done on the cluster")).unwrap_or("");
        assert!(done.contains(if kill { "lost=1" } else { "lost=0" }), "{log}");
        let written =
            std::fs::read(data.join(format!("data/{name}-00000-of-00001.parquet"))).unwrap();
        assert!(written == single, "{name}: the cluster's split differs from one process's");
    }
}

/// A run killed while writing leaves only its hidden temporary file, never a split; the next
/// run removes that file and writes the same split as an uninterrupted run.
#[test]
fn a_killed_run_publishes_nothing_and_the_next_run_clears_what_it_left() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf_home");
    std::fs::create_dir_all(&home).unwrap();
    let data = large_dataset(&tmp.path().join("big"), 150);
    let dir = data.join("data");
    let line = cluster_line(&data, "k");
    let mut child =
        corrupt_command(&home, &line).stderr(std::process::Stdio::null()).spawn().unwrap();
    let partial = |d: &Path| {
        std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".k-00000-of-00001.parquet.") && n.ends_with(".partial"))
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while partial(&dir).is_empty() {
        assert!(std::time::Instant::now() < deadline, "no temporary file appeared");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(partial(&dir).len(), 1, "the killed run's temporary file");
    assert!(!dir.join("k-00000-of-00001.parquet").exists(), "a split from a killed run");
    let splits = fusion_bench::data::files::find_split_files(&data, None, "k");
    assert!(splits.map_or(true, |f| f.is_empty()), "split `k` is visible");
    let test = fusion_bench::data::files::find_split_files(&data, None, "test").unwrap();
    assert_eq!(test.len(), 2, "the source split is unchanged");
    // The next run clears the leftover and writes the split.
    let out = corrupt_command(&home, &line).env("RUST_LOG", "info").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("removed what a killed run left"), "{}", stderr(&out));
    assert!(partial(&dir).is_empty(), "leftover kept: {:?}", partial(&dir));
    let rows =
        fusion_bench::data::parquet::read_rows(&dir.join("k-00000-of-00001.parquet")).unwrap();
    assert_eq!(rows.len(), 150);
}

/// A repository whose splits live outside `data/` (here `foo/test-*.parquet`, no card): a new
/// `data/NAME-*` file would hide them (`datasets` then sees only the sharded `data/` layout),
/// so the command undoes its write, says why, and leaves the folder as it was.
#[test]
fn a_layout_that_cannot_take_a_new_split_is_left_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let home = hf_home(tmp.path(), false);
    let repo = tmp.path().join("elsewhere");
    let src = snapshot(&home, "tanganke/eurosat").join("data/test-00000-of-00001.parquet");
    std::fs::create_dir_all(repo.join("foo")).unwrap();
    std::fs::copy(&src, repo.join("foo/test-00000-of-00001.parquet")).unwrap();
    let before = tree(&repo);
    let out =
        run(&home, &["corrupt", "--dataset", repo.to_str().unwrap(), "--corruption", "contrast"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("does not take a new split") && err.contains("contrast"), "{err}");
    assert!(tree(&repo) == before, "the folder changed");
    assert!(!repo.join("data").exists(), "the data/ folder the run made is left");
}

#[test]
fn bad_input_is_named_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let home = hf_home(tmp.path(), false);
    let dtd = snapshot(&home, "tanganke/dtd");
    let good =
        fusion_bench::data::parquet::read_rows(&dtd.join("data/test-00000-of-00001.parquet"))
            .unwrap();
    // Row 2 of 4 is not an image.
    let rows: Vec<(Vec<u8>, i64)> = good
        .iter()
        .take(4)
        .enumerate()
        .map(|(i, r)| (if i == 2 { b"not an image".to_vec() } else { r.bytes.clone() }, r.label))
        .collect();
    replace_test_split(&home, "tanganke/dtd", &rows);
    let before = tree(&home);
    let base = ["corrupt", "--dataset", "tanganke/dtd", "--split", "test"];
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--corruption", "fog"], vec!["unknown corruption `fog`", "gaussian_noise"]),
        (vec!["--corruption", "contrast", "--severity", "6"], vec!["severity", "`6`"]),
        (vec!["--corruption", "contrast", "--severity", "0"], vec!["severity", "`0`"]),
        (
            vec!["--corruption", "contrast", "--params", "cifar100"],
            vec!["unknown parameter set `cifar100`"],
        ),
        (
            vec!["--corruption", "contrast", "--name", "bad-name"],
            vec!["`bad-name` is not a valid split name"],
        ),
        (vec!["--corruption", "contrast", "--bogus"], vec!["unknown argument `--bogus`"]),
        (vec!["--severity", "2"], vec!["--corruption NAME is required"]),
        (
            vec!["--corruption", "contrast"],
            vec!["tanganke/dtd", "split `test`", "row 2", "does not decode"],
        ),
    ];
    for (extra, want) in cases {
        let args = [&base[..], &extra].concat();
        let out = run(&home, &args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded");
        for w in want {
            assert!(err.contains(w), "{args:?}: `{w}` not in: {err}");
        }
    }
    // A dataset or split that is not in the cache.
    let out = run(&home, &["corrupt", "--dataset", "tanganke/nope", "--corruption", "contrast"]);
    assert!(!out.status.success() && stderr(&out).contains("tanganke/nope"), "{}", stderr(&out));
    let out = run(
        &home,
        &[
            "corrupt",
            "--dataset",
            "tanganke/dtd",
            "--split",
            "validation",
            "--corruption",
            "contrast",
        ],
    );
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("validation") && err.contains("tanganke/dtd"),
        "{err}"
    );
    assert!(tree(&home) == before, "a failed command changed the hub cache");
}
