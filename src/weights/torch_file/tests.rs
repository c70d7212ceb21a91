//! Round trips in Rust; cross-checks against Python's `torch.save`/`torch.load` (the torch
//! venv of `scripts/env.sh` first on PATH: a missing `python` with torch fails the test);
//! committed fixtures (tests/fixtures/torch_files/, made by scripts/fixtures/torch_files.py)
//! for what that venv cannot make: `np.save` files and a storage saved at `cuda:0`.

use super::pickle_write::Pickler;
use super::save::archive_name;
use super::zip_read::{le16, SIG_CENTRAL};
use super::zip_write::{crc32_update, ZipWriter};
use super::*;
use std::fs::File;
use std::path::PathBuf;
use std::process::Command;

const PYTHON_MISSING: &str = "the torch_file tests need `python` with torch 2.11 first on \
                              PATH: run `source scripts/env.sh` first (scripts/test.sh does)";

/// Runs `script` with `python -c`, arguments `args`; its stdout.
fn python(script: &str, args: &[&Path]) -> String {
    let out = Command::new("python")
        .arg("-c")
        .arg(format!("import torch\n{script}"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `python` ({e}): {PYTHON_MISSING}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named 'torch'") {
        panic!("{PYTHON_MISSING}");
    }
    assert!(out.status.success(), "python failed:\n{stderr}\nscript:\n{script}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Python's side of [`show`]: one line per file, the object torch.load(weights_only=True)
/// gives, after `zipfile.testzip()` (every CRC) passed.
const PY_SHOW: &str = r#"
import struct, sys, zipfile
from collections import OrderedDict
def show(x):
    if isinstance(x, torch.Tensor):
        b = bytes(x.detach().reshape(-1).contiguous().view(torch.uint8).tolist())
        return "T(%s,%s,%s)" % (str(x.dtype).replace("torch.", ""), list(x.shape), b.hex())
    if isinstance(x, dict):
        tag = "OD" if type(x) is OrderedDict else "D"
        return tag + "{" + ",".join("%s:%s" % (k, show(v)) for k, v in x.items()) + "}"
    if isinstance(x, list):
        return "[" + ",".join(map(show, x)) + "]"
    if isinstance(x, tuple):
        return "(" + ",".join(map(show, x)) + ")"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return "I%d" % x
    if isinstance(x, float):
        return "F%d" % struct.unpack("<q", struct.pack("<d", x))[0]
    if isinstance(x, str):
        return "S" + x
    if x is None:
        return "None"
    raise TypeError(type(x))
for p in sys.argv[1:]:
    assert zipfile.ZipFile(p).testzip() is None, p
    print(show(torch.load(p, weights_only=True)))
"#;

fn show(v: &SaveValue<'_>) -> String {
    let join = |items: &[SaveValue<'_>]| items.iter().map(show).collect::<Vec<_>>().join(",");
    let dict = |tag: &str, items: &[(Cow<'_, str>, SaveValue<'_>)]| {
        let body: Vec<String> = items.iter().map(|(k, v)| format!("{k}:{}", show(v))).collect();
        format!("{tag}{{{}}}", body.join(","))
    };
    match v {
        SaveValue::Tensor(t) => {
            let hex: String = t.bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!("T({},{:?},{hex})", t.dtype, t.shape)
        }
        SaveValue::Dict(items) => dict("D", items),
        SaveValue::OrderedDict(items) => dict("OD", items),
        SaveValue::List(items) => format!("[{}]", join(items)),
        SaveValue::Tuple(items) => format!("({})", join(items)),
        SaveValue::Int(i) => format!("I{i}"),
        SaveValue::Float(x) => format!("F{}", x.to_bits() as i64),
        SaveValue::Str(s) => format!("S{s}"),
        SaveValue::Bool(b) => if *b { "True" } else { "False" }.to_string(),
        SaveValue::None => "None".to_string(),
    }
}

/// (i - 5) / 4 for i in 0..n, as Python's `(torch.arange(n, dtype=torch.float32) - 5) / 4`.
fn v(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 - 5.0) / 4.0).collect()
}

fn f32s(shape: &[usize], data: &[f32]) -> TensorData {
    TensorData::from_f32(shape, data)
}

fn typed(dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> TensorData {
    TensorData { dtype, shape: shape.to_vec(), bytes }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_files").join(name)
}

fn key(k: &str) -> Cow<'_, str> {
    Cow::Borrowed(k)
}

/// The tensors the Python cross-checks also build: [T], [T, P], 0-d, empty, other dtypes.
struct Tensors {
    task_wise: TensorData,
    layer_wise: TensorData,
    scalar: TensorData,
    empty: TensorData,
    f64: TensorData,
    i64: TensorData,
    bf16: TensorData,
    f16: TensorData,
    bool: TensorData,
    many: Vec<(String, TensorData)>,
}

fn tensors() -> Tensors {
    let v3 = v(3);
    Tensors {
        task_wise: f32s(&[8], &v(8)),
        layer_wise: f32s(&[4, 5], &v(20)),
        scalar: f32s(&[], &[2.5]),
        empty: f32s(&[0, 3], &[]),
        f64: typed(Dtype::F64, &[3], v3.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect()),
        i64: typed(Dtype::I64, &[3], (0..3i64).flat_map(|x| x.to_le_bytes()).collect()),
        bf16: typed(
            Dtype::BF16,
            &[3],
            v3.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        ),
        f16: typed(
            Dtype::F16,
            &[3],
            v3.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        ),
        bool: typed(Dtype::Bool, &[3], vec![1, 0, 1]),
        many: (0..1200).map(|i| (format!("p{i}"), f32s(&[], &[i as f32]))).collect(),
    }
}

/// `{"model": OrderedDict(...)}` as fabric.save writes, plus plain values.
fn checkpoint(t: &Tensors) -> SaveValue<'_> {
    SaveValue::Dict(vec![(
        key("model"),
        SaveValue::OrderedDict(vec![
            (key("a.weight"), SaveValue::Tensor(t.layer_wise.as_ref())),
            (key("a.bias"), SaveValue::Tensor(t.task_wise.as_ref())),
            (key("x"), SaveValue::Tensor(t.f64.as_ref())),
            (key("y"), SaveValue::Tensor(t.i64.as_ref())),
            (key("z"), SaveValue::Tensor(t.bf16.as_ref())),
        ]),
    )])
}

fn misc(t: &Tensors) -> SaveValue<'_> {
    SaveValue::Dict(vec![
        (key("step"), SaveValue::Int(3)),
        (key("lr"), SaveValue::Float(0.5)),
        (key("name"), SaveValue::Str(key("clip"))),
        (
            key("ints"),
            SaveValue::List(vec![
                SaveValue::Int(-5),
                SaveValue::Int(300),
                SaveValue::Int(70000),
                SaveValue::Int(1 << 40),
                SaveValue::Int(-(1 << 40)),
                SaveValue::Int(1 << 39),
                SaveValue::Int(i64::MIN),
                SaveValue::Int(i64::MAX),
            ]),
        ),
        (key("one"), SaveValue::List(vec![SaveValue::Bool(true)])),
        (key("none"), SaveValue::None),
        (key("flag"), SaveValue::Bool(false)),
        (key("empty"), SaveValue::OrderedDict(vec![])),
        (key("shape"), SaveValue::Tuple(vec![SaveValue::Int(4), SaveValue::Int(5)])),
        (key("t4"), SaveValue::Tuple((1..=4).map(SaveValue::Int).collect())),
        (key("f16"), SaveValue::Tensor(t.f16.as_ref())),
        (key("bool"), SaveValue::Tensor(t.bool.as_ref())),
        (key("scalar"), SaveValue::Tensor(t.scalar.as_ref())),
    ])
}

fn many(t: &Tensors) -> SaveValue<'_> {
    SaveValue::OrderedDict(
        t.many.iter().map(|(k, x)| (key(k.as_str()), SaveValue::Tensor(x.as_ref()))).collect(),
    )
}

/// What [`load`] gives for a saved value: OrderedDicts become dicts.
fn expected(v: &SaveValue<'_>) -> TorchValue {
    let dict = |items: &[(Cow<'_, str>, SaveValue<'_>)]| {
        TorchValue::Dict(items.iter().map(|(k, v)| (k.to_string(), expected(v))).collect())
    };
    match v {
        SaveValue::Tensor(t) => TorchValue::Tensor(TensorData {
            dtype: t.dtype,
            shape: t.shape.clone(),
            bytes: t.bytes.to_vec(),
        }),
        SaveValue::Dict(items) | SaveValue::OrderedDict(items) => dict(items),
        SaveValue::List(items) => TorchValue::List(items.iter().map(expected).collect()),
        SaveValue::Tuple(items) => TorchValue::Tuple(items.iter().map(expected).collect()),
        SaveValue::Int(i) => TorchValue::Int(*i),
        SaveValue::Float(x) => TorchValue::Float(*x),
        SaveValue::Str(s) => TorchValue::Str(s.to_string()),
        SaveValue::Bool(b) => TorchValue::Bool(*b),
        SaveValue::None => TorchValue::None,
    }
}

/// (file name, value) of every file the cross-checks write.
fn cases(t: &Tensors) -> Vec<(&'static str, SaveValue<'_>)> {
    vec![
        ("task_wise.pt", SaveValue::Tensor(t.task_wise.as_ref())),
        ("merging_weights.pt", SaveValue::Tensor(t.layer_wise.as_ref())),
        ("scalar.pt", SaveValue::Tensor(t.scalar.as_ref())),
        ("empty.pt", SaveValue::Tensor(t.empty.as_ref())),
        ("checkpoint.pth", checkpoint(t)),
        ("many.pt", many(t)),
    ]
}

#[test]
fn crc32_matches_the_check_value() {
    assert_eq!(crc32_update(0, b"123456789"), 0xCBF4_3926);
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
    let split = crc32_update(crc32_update(0, &data[..333]), &data[333..]);
    assert_eq!(split, crc32_update(0, &data));
}

#[test]
fn archive_name_is_the_stem() {
    assert_eq!(archive_name(Path::new("/x/merging_weights.pt")), "merging_weights");
    assert_eq!(archive_name(Path::new("a.b.pth")), "a.b");
    assert_eq!(archive_name(Path::new("noext")), "noext");
    assert_eq!(archive_name(Path::new(".pt")), "archive");
    assert_eq!(archive_name(Path::new("poids_é.pt")), "archive");
}

#[test]
fn round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let t = tensors();
    let mut all = cases(&t);
    all.push(("misc.pt", misc(&t)));
    for (name, value) in &all {
        let p = dir.path().join(name);
        save(&p, value).unwrap();
        assert_eq!(load(&p).unwrap(), expected(value), "{name}");
    }
    // A loaded value saves back to the same object.
    let p = dir.path().join("checkpoint.pth");
    let back = load(&p).unwrap();
    save(&p, &back.to_save_value()).unwrap();
    assert_eq!(load(&p).unwrap(), back);
    assert_eq!(
        back.get("model").and_then(|m| m.get("a.bias")).and_then(TorchValue::as_tensor),
        Some(&t.task_wise)
    );
    // No temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn save_f32_and_load_f32() {
    let dir = tempfile::tempdir().unwrap();
    for (shape, data) in [(vec![4], v(4)), (vec![4, 5], v(20)), (vec![], vec![1.5])] {
        let p = dir.path().join("w.pt");
        save_f32(&p, &shape, &data).unwrap();
        assert_eq!(load_f32(&p).unwrap(), (shape, data));
    }
    let p = dir.path().join("w.pth");
    let t = tensors();
    save(&p, &SaveValue::Tensor(t.f64.as_ref())).unwrap();
    assert_eq!(load_f32(&p).unwrap(), (vec![3], v(3)));
    save(&p, &SaveValue::Tensor(t.bf16.as_ref())).unwrap();
    assert_eq!(load_f32(&p).unwrap(), (vec![3], v(3)));
    let msg = |e: TorchFileError| e.to_string();
    save(&p, &SaveValue::Tensor(t.i64.as_ref())).unwrap();
    let e = msg(load_f32(&p).unwrap_err());
    assert!(e.contains(&p.display().to_string()) && e.contains("int64"), "{e}");
    save(&p, &checkpoint(&t)).unwrap();
    let e = msg(load_f32(&p).unwrap_err());
    assert!(e.contains("w.pth") && e.contains("found a dict"), "{e}");
    let other = dir.path().join("w.safetensors");
    std::fs::write(&other, b"x").unwrap();
    let e = msg(load_f32(&other).unwrap_err());
    assert!(e.contains("w.safetensors") && e.contains("extension"), "{e}");
    let e = msg(save_f32(dir.path().join("bad.pt"), &[2, 2], &[1.0]).unwrap_err());
    assert!(e.contains("bad.pt") && e.contains("needs 4 values"), "{e}");
    let short = TensorRef { dtype: Dtype::F32, shape: vec![3], bytes: &[0u8; 8] };
    let e = msg(save(dir.path().join("short.pt"), &SaveValue::Tensor(short)).unwrap_err());
    assert!(e.contains("short.pt") && e.contains("needs 12 bytes, got 8"), "{e}");
    // .npy through load_f32 (float64 converted, int64 refused).
    assert_eq!(load_f32(fixture("f4_v1.npy")).unwrap(), (vec![3, 4], v(12)));
    let thirds: Vec<f32> = (0..5).map(|i| (i as f64 / 3.0) as f32).collect();
    assert_eq!(load_f32(fixture("f8.npy")).unwrap(), (vec![5], thirds));
    let e = msg(load_f32(fixture("i8.npy")).unwrap_err());
    assert!(e.contains("i8.npy") && e.contains("int64"), "{e}");
}

#[test]
fn torch_load_reads_what_we_save() {
    let dir = tempfile::tempdir().unwrap();
    let t = tensors();
    let mut all = cases(&t);
    all.push(("misc.pt", misc(&t)));
    let paths: Vec<PathBuf> = all.iter().map(|(n, _)| dir.path().join(n)).collect();
    for ((_, value), p) in all.iter().zip(&paths) {
        save(p, value).unwrap();
    }
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let out = python(PY_SHOW, &refs);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), all.len(), "{out}");
    for ((name, value), line) in all.iter().zip(lines) {
        assert_eq!(line, show(value), "{name}");
    }
}

/// The serialization id's first 20 digits (and so its CRC) are the one part that differs
/// from torch's (module docs): masked out; the second 20 digits (torch's combined CRC) kept.
fn masked(path: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    let archive = ZipArchive::open(path, "test").unwrap();
    let id = archive.find(".data/serialization_id").unwrap();
    let h = id.header_offset as usize;
    let data = h + 30 + le16(&bytes, h + 26) as usize + le16(&bytes, h + 28) as usize;
    bytes[data..data + 20].fill(b'0');
    bytes[data + 44..data + 48].fill(0); // the descriptor's CRC
    let cd = bytes.windows(4).rposition(|w| w == SIG_CENTRAL.to_le_bytes()).unwrap();
    bytes[cd + 16..cd + 20].fill(0);
    bytes
}

#[test]
fn save_matches_torch_save_byte_for_byte() {
    let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let t = tensors();
    python(
        r#"
import sys
from collections import OrderedDict
d = sys.argv[1]
v = lambda n: (torch.arange(n, dtype=torch.float32) - 5) / 4
torch.save(v(8), d + "/task_wise.pt")
torch.save(v(20).reshape(4, 5), d + "/merging_weights.pt")
torch.save(torch.tensor(2.5), d + "/scalar.pt")
torch.save(torch.zeros(0, 3), d + "/empty.pt")
torch.save({"model": OrderedDict([("a.weight", v(20).reshape(4, 5)), ("a.bias", v(8)),
    ("x", v(3).double()), ("y", torch.arange(3)), ("z", v(3).bfloat16())])}, d + "/checkpoint.pth")
torch.save(OrderedDict((f"p{i}", torch.tensor(float(i))) for i in range(1200)), d + "/many.pt")
"#,
        &[theirs.path()],
    );
    for (name, value) in cases(&t) {
        let (a, b) = (ours.path().join(name), theirs.path().join(name));
        save(&a, &value).unwrap();
        let (a, b) = (masked(&a), masked(&b));
        assert_eq!(a.len(), b.len(), "{name}: file sizes differ");
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        assert_eq!(first, None, "{name}: first difference at byte {first:?}");
    }
}

#[test]
fn load_reads_what_torch_saves() {
    let dir = tempfile::tempdir().unwrap();
    python(
        r#"
import datetime, io, os, sys
from collections import OrderedDict
os.chdir(sys.argv[1])
v = lambda n: (torch.arange(n, dtype=torch.float32) - 5) / 4
torch.save(v(12).reshape(3, 4), "plain.pt")
torch.save(torch.nn.Parameter(v(4)), "param.pt")
base = v(24).reshape(4, 6)
torch.save(base[1:, ::2].t(), "view.pt")
torch.save(base[2], "row.pt")
torch.save({"a": base[:, 1], "b": base[1:3]}, "shared.pt")
lin = torch.nn.Linear(3, 2)
with torch.no_grad():
    lin.weight.copy_(v(6).reshape(2, 3))
    lin.bias.copy_(v(2))
torch.save({"model": lin.state_dict()}, "fabric.ckpt.pt")
torch.save(OrderedDict([("x", v(3).double()), ("y", torch.arange(4) - 2), ("z", v(3).half()),
    ("w", v(3).bfloat16()), ("b", torch.tensor([True, False, True])),
    ("i", (torch.arange(3) - 1).int()), ("u", torch.arange(3).to(torch.uint8))]), "dtypes.pt")
torch.save([1, -5, 70000, 2**40, -2**40, 1.5, "s", None, True, (1, 2, 3, 4),
    torch.Size([2, 3]), {0: "int key"}], "misc.pt")
b = io.BytesIO()
torch.save(v(3), b)
open("stream.pt", "wb").write(b.getvalue())
torch.save(v(300).reshape(3, 100), "big.pt")
torch.save(torch.tensor(7.0), "scalar.pt")
torch.save(torch.zeros(2, 0, 3), "empty.pt")
torch.save(v(6).reshape(2, 3), "legacy.pt", _use_new_zipfile_serialization=False)
torch.save({"when": datetime.date(2020, 1, 1)}, "datetime.pt")
"#,
        &[dir.path()],
    );
    let read = |name: &str| load(dir.path().join(name)).unwrap();
    let t = |shape: &[usize], data: Vec<f32>| TorchValue::Tensor(f32s(shape, &data));
    let base = v(24);
    assert_eq!(read("plain.pt"), t(&[3, 4], v(12)));
    assert_eq!(read("param.pt"), t(&[4], v(4)));
    // base[1:, ::2].t(): element (i, j) is base[1 + j][2 i].
    let view: Vec<f32> =
        (0..3).flat_map(|i| (0..3).map(move |j| (1 + j) * 6 + 2 * i)).map(|k| base[k]).collect();
    assert_eq!(read("view.pt"), t(&[3, 3], view));
    assert_eq!(read("row.pt"), t(&[6], base[12..18].to_vec()));
    let col: Vec<f32> = (0..4).map(|r| base[r * 6 + 1]).collect();
    assert_eq!(
        read("shared.pt"),
        TorchValue::Dict(vec![
            ("a".into(), t(&[4], col)),
            ("b".into(), t(&[2, 6], base[6..18].to_vec())),
        ])
    );
    assert_eq!(
        read("fabric.ckpt.pt"),
        TorchValue::Dict(vec![(
            "model".into(),
            TorchValue::Dict(vec![
                ("weight".into(), t(&[2, 3], v(6))),
                ("bias".into(), t(&[2], v(2))),
            ])
        )])
    );
    let tt = tensors();
    let le = |xs: &[i64], f: fn(i64) -> Vec<u8>| xs.iter().flat_map(|&x| f(x)).collect();
    let dtypes = [
        ("x", tt.f64.clone()),
        ("y", typed(Dtype::I64, &[4], le(&[-2, -1, 0, 1], |x| x.to_le_bytes().to_vec()))),
        ("z", tt.f16.clone()),
        ("w", tt.bf16.clone()),
        ("b", tt.bool.clone()),
        ("i", typed(Dtype::I32, &[3], le(&[-1, 0, 1], |x| (x as i32).to_le_bytes().to_vec()))),
        ("u", typed(Dtype::U8, &[3], vec![0, 1, 2])),
    ];
    assert_eq!(
        read("dtypes.pt"),
        TorchValue::Dict(
            dtypes.into_iter().map(|(k, x)| (k.into(), TorchValue::Tensor(x))).collect()
        )
    );
    use TorchValue::{Int, Tuple};
    assert_eq!(
        read("misc.pt"),
        TorchValue::List(vec![
            Int(1),
            Int(-5),
            Int(70000),
            Int(1 << 40),
            Int(-(1 << 40)),
            TorchValue::Float(1.5),
            TorchValue::Str("s".into()),
            TorchValue::None,
            TorchValue::Bool(true),
            Tuple(vec![Int(1), Int(2), Int(3), Int(4)]),
            Tuple(vec![Int(2), Int(3)]),
            TorchValue::Dict(vec![("0".into(), TorchValue::Str("int key".into()))]),
        ])
    );
    assert_eq!(read("stream.pt"), t(&[3], v(3)));
    assert_eq!(read("big.pt"), t(&[3, 100], v(300)));
    assert_eq!(read("scalar.pt"), t(&[], vec![7.0]));
    assert_eq!(read("empty.pt"), t(&[2, 0, 3], vec![]));

    let err = |name: &str| load(dir.path().join(name)).unwrap_err().to_string();
    let e = err("legacy.pt");
    assert!(e.contains("legacy.pt") && e.contains("legacy") && e.contains("re-save"), "{e}");
    let e = err("datetime.pt");
    assert!(e.contains("datetime.pt") && e.contains("`datetime.date`"), "{e}");
}

#[test]
fn reads_a_parameter_saved_on_cuda() {
    // Made by scripts/fixtures/torch_files.py: location_tag patched to "cuda:0".
    let p = fixture("param_cuda0.pt");
    let raw = std::fs::read(&p).unwrap();
    assert!(raw.windows(6).any(|w| w == b"cuda:0"));
    let expect: Vec<f32> = (0..8).map(|i| (i as f32 - 3.0) / 8.0).collect();
    assert_eq!(load(&p).unwrap(), TorchValue::Tensor(f32s(&[8], &expect)));
    assert_eq!(load_f32(&p).unwrap(), (vec![8], expect));
}

#[test]
fn reads_npy_files() {
    assert_eq!(load_npy(fixture("f4_v1.npy")).unwrap(), f32s(&[3, 4], &v(12)));
    assert_eq!(load_npy(fixture("f4_v2.npy")).unwrap(), f32s(&[2, 2], &v(4)));
    assert_eq!(load_npy(fixture("f4_v3.npy")).unwrap(), f32s(&[2, 2], &v(4)));
    assert_eq!(load_npy(fixture("scalar_f4.npy")).unwrap(), f32s(&[], &[1.5]));
    assert_eq!(load_npy(fixture("empty_f4.npy")).unwrap(), f32s(&[0, 3], &[]));
    let thirds = (0..5).flat_map(|i| (i as f64 / 3.0).to_le_bytes()).collect();
    assert_eq!(load_npy(fixture("f8.npy")).unwrap(), typed(Dtype::F64, &[5], thirds));
    let ints = (-2..4i64).flat_map(|i| i.to_le_bytes()).collect();
    assert_eq!(load_npy(fixture("i8.npy")).unwrap(), typed(Dtype::I64, &[2, 3], ints));
    for (name, what) in [("fortran_f4.npy", "fortran_order"), ("big_endian_f4.npy", "big-endian")] {
        let e = load_npy(fixture(name)).unwrap_err().to_string();
        assert!(e.contains(&fixture(name).display().to_string()) && e.contains(what), "{e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("short.npy");
    let mut bytes = std::fs::read(fixture("f4_v1.npy")).unwrap();
    bytes.truncate(bytes.len() - 4);
    std::fs::write(&p, &bytes).unwrap();
    let e = load_npy(&p).unwrap_err().to_string();
    assert!(e.contains("short.npy") && e.contains("needs 48 bytes"), "{e}");
}

/// An archive of the given records, laid out as torch does.
fn write_archive(path: &Path, records: &[(&str, &[u8])]) {
    let mut zip = ZipWriter::new(File::create(path).unwrap(), "x", ZIP64_LIMIT);
    for (name, data) in records {
        zip.record(name, data).unwrap();
    }
    zip.finish().unwrap();
}

fn pickle_of(v: &SaveValue<'_>) -> Vec<u8> {
    let mut p = Pickler::new();
    p.value(v);
    p.out.push(b'.');
    p.out
}

#[test]
fn errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = |p: &Path| {
        let e = load(p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        e
    };
    // Truncated: the end of the central directory is gone.
    let p = dir.path().join("truncated.pt");
    save_f32(&p, &[4, 5], &v(20)).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert!(err(&p).contains("truncated"));
    // Not a zip at all.
    let p = dir.path().join("text.pt");
    std::fs::write(&p, b"hello, world\n").unwrap();
    assert!(err(&p).contains("not a torch.save zip archive"));
    let p = dir.path().join("missing.pt");
    assert!(err(&p).contains("No such file"));
    // A global no weights-only unpickler allows.
    let p = dir.path().join("global.pt");
    write_archive(&p, &[("data.pkl", b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85R.")]);
    assert!(err(&p).contains("`os.system`"));
    // Storage record absent, or of the wrong length.
    let t = f32s(&[2], &[1.0, 2.0]);
    let pkl = pickle_of(&SaveValue::Tensor(t.as_ref()));
    let p = dir.path().join("nodata.pt");
    write_archive(&p, &[("data.pkl", &pkl), ("byteorder", b"little")]);
    assert!(err(&p).contains("record `x/data/0` is missing"));
    let p = dir.path().join("sizes.pt");
    write_archive(&p, &[("data.pkl", &pkl), ("data/0", &[0u8; 7])]);
    assert!(err(&p).contains("wrong sizes"));
    // A view reaching past its storage.
    let mut bad = pkl.clone();
    let at = bad.windows(3).position(|w| w == [b'K', 2, 0x85]).unwrap(); // size (2,)
    bad[at + 1] = 3;
    let p = dir.path().join("view.pt");
    write_archive(&p, &[("data.pkl", &bad), ("data/0", &t.bytes)]);
    assert!(err(&p).contains("reaches past its storage"));
    // Cut-off pickle; big-endian archive.
    let p = dir.path().join("cut.pt");
    write_archive(&p, &[("data.pkl", &pkl[..pkl.len() / 2]), ("data/0", &t.bytes)]);
    assert!(err(&p).contains("bad pickle"));
    let p = dir.path().join("big.pt");
    write_archive(&p, &[("data.pkl", &pkl), ("byteorder", b"big"), ("data/0", &t.bytes)]);
    assert!(err(&p).contains("little-endian"));
}

#[test]
fn zip64_fields_when_sizes_or_offsets_reach_the_limit() {
    // The limit is 2^32 - 1 for real; 1000, 100 or 0 bytes here, so that the archives hold
    // entries with no ZIP64 field, with a ZIP64 size, a ZIP64 offset, and both.
    let dir = tempfile::tempdir().unwrap();
    let t = tensors();
    let big = f32s(&[100], &v(100));
    let value = SaveValue::OrderedDict(vec![
        (key("big"), SaveValue::Tensor(big.as_ref())),
        (key("small"), SaveValue::Tensor(t.task_wise.as_ref())),
        (key("empty"), SaveValue::Tensor(t.empty.as_ref())),
    ]);
    const LIMITS: [u64; 3] = [1000, 100, 0];
    let paths: Vec<PathBuf> = LIMITS
        .iter()
        .map(|&limit| {
            let p = dir.path().join(format!("zip64_{limit}.pt"));
            save_with_zip64_threshold(&p, &value, limit).unwrap();
            assert_eq!(load(&p).unwrap(), expected(&value));
            p
        })
        .collect();
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let out = python(PY_SHOW, &refs);
    assert_eq!(out.lines().collect::<Vec<_>>(), vec![show(&value); LIMITS.len()], "{out}");
    // Python's zipfile sees ZIP64 extra fields exactly where expected, with the right values.
    let out = python(
        r#"
import sys, zipfile
for p in sys.argv[1:]:
    for i in zipfile.ZipFile(p).infolist():
        print(i.filename, i.file_size, i.header_offset, i.extra[:2] == b"\x01\x00")
"#,
        &refs,
    );
    let mut lines = out.lines();
    let mut kinds = std::collections::BTreeSet::new();
    for (p, limit) in paths.iter().zip(LIMITS) {
        let archive = ZipArchive::open(p, "test").unwrap();
        for e in &archive.entries {
            let zip64 = e.size >= limit || e.header_offset >= limit;
            let line = format!(
                "{} {} {} {}",
                e.name,
                e.size,
                e.header_offset,
                if zip64 { "True" } else { "False" }
            );
            assert_eq!(lines.next(), Some(line.as_str()));
            kinds.insert((e.size >= limit, e.header_offset >= limit));
        }
    }
    assert_eq!(kinds.len(), 4, "{kinds:?}");
}
