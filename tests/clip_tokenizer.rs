//! The CLIP tokenizer against Hugging Face `CLIPTokenizerFast` (transformers 4.57.6): every task
//! prompt and a set of tricky strings, from `tests/fixtures/golden/tokenizer_cases.json`
//! (written by `scripts/fixtures/golden_tokenizer.py`).

use fusion_bench::models::clip::tokenizer::{ClipTokenizer, TokenizerError};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_dir(&fixture("tests/fixtures/clip_tokenizer")).unwrap()
}

fn golden() -> serde_json::Value {
    let path = fixture("tests/fixtures/golden/tokenizer_cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// `(text, ids)` of every single-text case.
fn cases() -> Vec<(String, Vec<i64>)> {
    let golden = golden();
    let cases = golden["cases"].as_array().unwrap();
    cases.iter().map(|c| (c["text"].as_str().unwrap().to_owned(), ids(&c["ids"]))).collect()
}

/// Every mismatch, reported together.
fn check_all(tok: &ClipTokenizer, cases: &[(String, Vec<i64>)]) {
    let bad: Vec<String> = cases
        .iter()
        .filter_map(|(text, want)| {
            let got = tok.encode(text);
            (&got != want).then(|| format!("{text:?}\n  got  {got:?}\n  want {want:?}"))
        })
        .collect();
    assert!(bad.is_empty(), "{} of {} cases differ:\n{}", bad.len(), cases.len(), bad.join("\n"));
}

#[test]
fn known_ids() {
    let tok = tokenizer();
    assert_eq!(tok.encode("a photo of a cat."), [49406, 320, 1125, 539, 320, 2368, 269, 49407]);
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (49406, 49407, 49407));
    assert_eq!((tok.vocab_size(), tok.model_max_length()), (49408, 77));
}

#[test]
fn matches_hugging_face_on_every_golden_case() {
    let cases = cases();
    assert!(cases.len() > 3000, "only {} cases in the golden file", cases.len());
    check_all(&tokenizer(), &cases);
    eprintln!("{} golden cases match", cases.len());
}

#[test]
fn batches_pad_like_hugging_face() {
    let tok = tokenizer();
    let golden = golden();
    let batches = golden["batches"].as_array().unwrap();
    assert!(!batches.is_empty(), "no batch in the golden file");
    println!("{} golden batches", batches.len());
    for b in batches {
        let texts: Vec<&str> =
            b["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        let (got_ids, got_mask, len) = tok.encode_batch(&texts);
        let rows = b["input_ids"].as_array().unwrap();
        let want_ids: Vec<i64> = rows.iter().flat_map(ids).collect();
        let want_mask: Vec<i64> =
            b["attention_mask"].as_array().unwrap().iter().flat_map(ids).collect();
        assert_eq!(len, rows[0].as_array().unwrap().len(), "{texts:?}");
        assert_eq!(got_ids, want_ids, "{texts:?}");
        assert_eq!(got_mask, want_mask, "{texts:?}");
    }
    let empty: [&str; 0] = [];
    assert_eq!(tok.encode_batch(&empty), (vec![], vec![], 0));
}

#[test]
fn vocab_and_merges_alone_give_the_same_ids() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(fixture("tests/fixtures/clip_tokenizer").join(f), tmp.path().join(f))
            .unwrap();
    }
    let tok = ClipTokenizer::from_dir(tmp.path()).unwrap();
    assert_eq!((tok.pad_id(), tok.model_max_length()), (49407, 77));
    check_all(&tok, &cases());
}

#[test]
fn config_sets_max_length_and_pad_token() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(fixture("tests/fixtures/clip_tokenizer").join(f), tmp.path().join(f))
            .unwrap();
    }
    let config = r#"{"model_max_length": 5, "pad_token": {"content": "!", "special": true}}"#;
    std::fs::write(tmp.path().join("tokenizer_config.json"), config).unwrap();
    let tok = ClipTokenizer::from_dir(tmp.path()).unwrap();
    assert_eq!(tok.encode("a photo of a cat."), [49406, 320, 1125, 539, 49407]);
    let (ids, mask, len) = tok.encode_batch(&["a photo of a cat.", "cat"]);
    assert_eq!(len, 5);
    assert_eq!(ids, [49406, 320, 1125, 539, 49407, 49406, 2368, 49407, 0, 0]);
    assert_eq!(mask, [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]);
}

fn load_error(dir: &Path) -> String {
    let e: TokenizerError = ClipTokenizer::from_dir(dir).expect_err("loading must fail");
    e.to_string()
}

#[test]
fn missing_and_corrupt_files_are_named() {
    let src = fixture("tests/fixtures/clip_tokenizer");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let e = load_error(dir);
    assert!(e.contains("vocab.json") && e.contains("cannot read"), "{e}");

    std::fs::copy(src.join("vocab.json"), dir.join("vocab.json")).unwrap();
    let e = load_error(dir);
    assert!(e.contains("merges.txt") && e.contains("cannot read"), "{e}");

    std::fs::write(dir.join("merges.txt"), "#version: 0.2\ni n\nthis line has three\n").unwrap();
    let e = load_error(dir);
    assert!(e.contains("merges.txt") && e.contains("line 3"), "{e}");

    std::fs::write(dir.join("merges.txt"), "#version: 0.2\ni n\nqq zz\n").unwrap();
    let e = load_error(dir);
    assert!(e.contains("vocab.json") && e.contains("merge 2 `qq zz`"), "{e}");

    std::fs::write(dir.join("vocab.json"), "{\"a\": 1,").unwrap();
    let e = load_error(dir);
    assert!(e.contains("vocab.json") && e.contains("not valid JSON"), "{e}");

    std::fs::write(dir.join("vocab.json"), "{\"a\": -1}").unwrap();
    let e = load_error(dir);
    assert!(e.contains("vocab.json") && e.contains("\"a\""), "{e}");

    std::fs::write(dir.join("tokenizer.json"), "{\"model\": {\"type\": \"BPE\"}}").unwrap();
    let e = load_error(dir);
    assert!(e.contains("tokenizer.json") && e.contains("model.vocab"), "{e}");

    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "{\"model_max_length\": 1}").unwrap();
    let e = load_error(dir);
    assert!(e.contains("tokenizer_config.json") && e.contains("model_max_length"), "{e}");
    std::fs::write(dir.join("tokenizer_config.json"), "{\"pad_token\": \"<pad>\"}").unwrap();
    let e = load_error(dir);
    assert!(e.contains("tokenizer_config.json") && e.contains("\"<pad>\""), "{e}");
}

#[test]
fn encodes_all_task_prompts_alike_from_many_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ClipTokenizer>();
    let tasks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("src/tasks/tasks.json")).unwrap())
            .unwrap();
    let mut prompts = Vec::new();
    for task in tasks.as_object().unwrap().values() {
        for t in task["templates"].as_array().unwrap() {
            for c in task["classnames"].as_array().unwrap() {
                prompts.push(t.as_str().unwrap().replace("{}", c.as_str().unwrap()));
            }
        }
    }
    let start = Instant::now();
    let tok = tokenizer();
    let loaded = start.elapsed();
    let cold = Instant::now();
    let (ids, _, len) = tok.encode_batch(&prompts);
    let cold = cold.elapsed();
    let warm = Instant::now();
    let (again, _, _) = tok.encode_batch(&prompts);
    let warm = warm.elapsed();
    assert_eq!(ids, again);
    eprintln!(
        "{} prompts (L = {len}): load {loaded:.2?}, encode cold {cold:.2?}, warm {warm:.2?}",
        prompts.len()
    );
    let per_thread: Vec<Vec<i64>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            prompts.chunks(1000).map(|c| s.spawn(|| tok.encode_batch(c).0)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let singles: Vec<Vec<i64>> = prompts.iter().map(|p| tok.encode(p)).collect();
    let mut k = 0;
    for (chunk, got) in prompts.chunks(1000).zip(&per_thread) {
        let width = got.len() / chunk.len();
        for row in got.chunks(width) {
            let real: Vec<i64> = row.iter().copied().take(singles[k].len()).collect();
            assert_eq!(real, singles[k]);
            k += 1;
        }
    }
    assert!(k > 3000, "only {k} prompts");
    assert_eq!(k, prompts.len(), "every prompt compared");
}
