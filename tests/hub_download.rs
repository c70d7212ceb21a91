//! `hub::download::prefetch` against a loopback stand-in for the Hugging Face hub that serves the
//! fixture cache (`tests/fixtures/hf_home/hub`) through the endpoints hf-hub 1.0 calls:
//! `GET /api/{models,datasets}/{id}/revision/{rev}` (commit sha),
//! `GET /api/{models,datasets}/{id}/tree/{rev}?recursive=true` (file list) and
//! `HEAD`/`GET /[datasets/]{id}/resolve/{rev}/{file}` (`X-Repo-Commit`, `ETag`, body).
#![cfg(feature = "download")]

use fusion_bench::hub::{download, Hub, RepoType};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hf_home/hub");
/// Served in every model repo's listing; prefetch must not take it.
const EXTRA_WEIGHTS: &str = "pytorch_model.bin";

/// The fixture snapshot of `{models,datasets}--org--name`: (commit, dir).
fn fixture_repo(kind: &str, id: &str) -> Option<(String, PathBuf)> {
    let repo = Path::new(FIXTURES).join(format!("{kind}--{}", id.replace('/', "--")));
    let commit = std::fs::read_to_string(repo.join("refs/main")).ok()?.trim().to_string();
    let dir = repo.join("snapshots").join(&commit);
    dir.is_dir().then_some((commit, dir))
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        if e.path().is_dir() {
            walk(&e.path(), &format!("{name}/"), out);
        } else {
            out.push(name);
        }
    }
}

/// A content hash good enough to name blobs (the hub uses the git/LFS oid).
fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}{:08x}", bytes.len())
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8], head: bool) {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let _ = s.write_all(out.as_bytes());
    if !head {
        let _ = s.write_all(body);
    }
    let _ = s.flush();
}

fn handle(mut s: TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let req = String::from_utf8_lossy(&req);
    let mut parts = req.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head = method == "HEAD";
    let path = target.split('?').next().unwrap_or("");
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let json = |v: serde_json::Value| v.to_string().into_bytes();
    let ct = |t: &str| vec![("Content-Type".to_string(), t.to_string())];
    match segs.as_slice() {
        // GET /api/{models,datasets}/org/name/revision/rev
        ["api", kind @ ("models" | "datasets"), org, name, "revision", _rev] => {
            match fixture_repo(kind, &format!("{org}/{name}")) {
                Some((commit, dir)) => {
                    let mut files = Vec::new();
                    walk(&dir, "", &mut files);
                    let siblings: Vec<_> =
                        files.iter().map(|f| serde_json::json!({ "rfilename": f })).collect();
                    let body = json(serde_json::json!({
                        "id": format!("{org}/{name}"), "sha": commit, "siblings": siblings
                    }));
                    respond(&mut s, "200 OK", &ct("application/json"), &body, head);
                }
                None => respond(&mut s, "404 Not Found", &[], b"{}", head),
            }
        }
        // GET /api/{models,datasets}/org/name/tree/rev?recursive=true
        ["api", kind @ ("models" | "datasets"), org, name, "tree", _rev] => {
            match fixture_repo(kind, &format!("{org}/{name}")) {
                Some((_, dir)) => {
                    let mut files = Vec::new();
                    walk(&dir, "", &mut files);
                    let mut entries: Vec<_> = files
                        .iter()
                        .map(|f| {
                            let bytes = std::fs::read(dir.join(f)).unwrap();
                            serde_json::json!({
                                "type": "file", "oid": etag(&bytes), "size": bytes.len(), "path": f
                            })
                        })
                        .collect();
                    if *kind == "models" {
                        entries.push(serde_json::json!({
                            "type": "file", "oid": "0", "size": 4, "path": EXTRA_WEIGHTS
                        }));
                    }
                    respond(&mut s, "200 OK", &ct("application/json"), &json(entries.into()), head);
                }
                None => respond(&mut s, "404 Not Found", &[], b"{}", head),
            }
        }
        // HEAD/GET /[datasets/]org/name/resolve/rev/file…
        _ => {
            let (kind, rest) = match segs.first() {
                Some(&"datasets") => ("datasets", &segs[1..]),
                _ => ("models", &segs[..]),
            };
            let found = match rest {
                [org, name, "resolve", _rev, file @ ..] if !file.is_empty() => {
                    fixture_repo(kind, &format!("{org}/{name}"))
                        .map(|(c, d)| (c, d, file.join("/")))
                }
                _ => None,
            };
            let Some((commit, dir, file)) = found else {
                return respond(&mut s, "404 Not Found", &[], b"not found", head);
            };
            let bytes = if file == EXTRA_WEIGHTS && kind == "models" {
                Some(b"junk".to_vec())
            } else {
                std::fs::read(dir.join(&file)).ok()
            };
            let commit_header = ("X-Repo-Commit".to_string(), commit);
            match bytes {
                Some(b) => {
                    let headers = vec![commit_header, ("ETag".into(), format!("\"{}\"", etag(&b)))];
                    respond(&mut s, "200 OK", &headers, &b, head)
                }
                None => respond(&mut s, "404 Not Found", &[commit_header], b"not found", head),
            }
        }
    }
}

/// Serves the fixtures on 127.0.0.1 until `stop` is set or 120 s have passed.
fn serve() -> (String, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let server = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    std::thread::spawn(move || handle(s));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(_) => break,
            }
        }
    });
    (endpoint, stop, server)
}

/// Runs `prefetch` on a thread and fails the test if it takes over 60 s.
fn prefetch_bounded(
    models: &[&str],
    datasets: &[&str],
    cache: &Path,
    endpoint: &str,
) -> anyhow::Result<()> {
    let (models, datasets): (Vec<String>, Vec<String>) = (
        models.iter().map(|s| s.to_string()).collect(),
        datasets.iter().map(|s| s.to_string()).collect(),
    );
    let (cache, endpoint) = (cache.to_path_buf(), endpoint.to_string());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(download::prefetch(&models, &datasets, &cache, Some(&endpoint)));
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("prefetch did not finish within 60 s")
}

fn assert_same_tree(fixture: &Path, got: &Path) {
    let mut files = Vec::new();
    walk(fixture, "", &mut files);
    assert!(!files.is_empty());
    for f in files {
        let want = std::fs::read(fixture.join(&f)).unwrap();
        let have =
            std::fs::read(got.join(&f)).unwrap_or_else(|e| panic!("{f} in {}: {e}", got.display()));
        assert!(want == have, "{f} differs from the fixture");
    }
}

#[test]
fn prefetch_fills_a_cache_that_hub_resolves_offline() {
    let (endpoint, stop, server) = serve();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let (model, dataset) = ("tanganke/clip-vit-base-patch32_mnist", "ylecun/mnist");

    prefetch_bounded(&[model], &[dataset], &cache, &endpoint).unwrap();
    // a second run finds everything cached and succeeds
    prefetch_bounded(&[model], &[dataset], &cache, &endpoint).unwrap();
    // an unknown repo is an error naming it
    let e = prefetch_bounded(&["nobody/nothing"], &[], &cache, &endpoint).unwrap_err();
    assert!(format!("{e:#}").contains("nobody/nothing"), "{e:#}");

    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();

    let hub = Hub::new(&cache);
    let (_, fixture) = fixture_repo("models", model).unwrap();
    let got = hub.resolve(model, RepoType::Model, None).unwrap();
    assert_same_tree(&fixture, &got);
    assert!(!got.join(EXTRA_WEIGHTS).exists(), "pytorch weights must be skipped");
    assert!(hub.file(model, RepoType::Model, "model.safetensors").is_ok());

    let (_, fixture) = fixture_repo("datasets", dataset).unwrap();
    let got = hub.resolve_dataset("mnist").unwrap();
    assert_same_tree(&fixture, &got);

    // what `--prefetch` collects from a composed config
    let args: Vec<String> = [
        "method=dummy",
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
        "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
    ]
    .map(String::from)
    .to_vec();
    let composed = fusion_bench::config::compose_from_args(
        &args,
        &fusion_bench::config::default_config_dirs(),
    )
    .unwrap();
    let (models, datasets) = download::config_repos(&composed.program_config().unwrap());
    assert_eq!(models.len(), 9, "{models:?}"); // pretrained + 8 fine-tuned; base model deduplicated
    assert!(models.iter().any(|m| m == "openai/clip-vit-base-patch32"), "{models:?}");
    assert!(models.iter().any(|m| m == model), "{models:?}");
    assert!(
        datasets.iter().any(|d| d == dataset),
        "legacy `mnist` maps to ylecun/mnist: {datasets:?}"
    );
    assert!(!datasets.iter().any(|d| d == "mnist"), "{datasets:?}");
    assert_eq!(datasets.len(), 8, "{datasets:?}");

    // HF_HUB_OFFLINE refuses before touching the network (the only test in this binary, so
    // changing the environment races with nothing).
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let e = download::prefetch(&[model.to_string()], &[], &cache, Some("http://127.0.0.1:9"))
        .unwrap_err();
    std::env::remove_var("HF_HUB_OFFLINE");
    assert!(e.to_string().contains("HF_HUB_OFFLINE"), "{e}");
}
