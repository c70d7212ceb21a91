//! Unpickling `data.pkl`: the protocol-2 subset `torch/_weights_only_unpickler.py` accepts, the
//! allowlisted globals, storages' persistent ids and the rebuild of tensors, `nn.Parameter`s,
//! `OrderedDict`s and `torch.Size`s (tensor bytes are left in the archive: see `resolve`).

use super::zip_read::{le16, le32};
use super::{Dtype, Result, TorchFileError};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A global this reader rebuilds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Global {
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    OrderedDict,
    Size,
    Parameter,
    Storage(Dtype),
}

impl Global {
    fn lookup(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch", "Size") => Global::Size,
            ("torch.nn.parameter", "Parameter") => Global::Parameter,
            ("torch" | "torch.storage", class) => {
                Global::Storage(Dtype::from_storage_class(class)?)
            }
            _ => return None,
        })
    }
}

/// A storage's persistent id.
#[derive(Debug)]
pub(super) struct StorageRef {
    pub(super) dtype: Dtype,
    pub(super) key: String,
    pub(super) numel: u64,
}

/// A tensor whose bytes are still in the archive.
#[derive(Debug)]
pub(super) struct LazyTensor {
    pub(super) storage: Rc<StorageRef>,
    pub(super) offset: u64,
    pub(super) size: Vec<u64>,
    pub(super) stride: Vec<u64>,
}

/// An unpickled object. Lists and dicts are shared (the memo refers to them, SETITEMS mutates).
#[derive(Debug, Clone)]
pub(super) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<LazyTensor>),
}

impl Value {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

pub(super) struct Unpickler<'a> {
    data: &'a [u8],
    path: &'a str,
    pos: usize,
    /// Start of the opcode being run, for errors.
    op_at: usize,
    stack: Vec<Value>,
    metastack: Vec<Vec<Value>>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    pub(super) fn new(data: &'a [u8], path: &'a str) -> Self {
        Self {
            data,
            path,
            pos: 0,
            op_at: 0,
            stack: Vec::new(),
            metastack: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn err(&self, reason: impl Into<String>) -> TorchFileError {
        TorchFileError::Pickle {
            path: self.path.to_string(),
            offset: self.op_at,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err("data.pkl ends in the middle of an opcode")),
        }
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(le32(self.take(4)?, 0))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n =
            rest.iter().position(|&b| b == b'\n').ok_or_else(|| self.err("unterminated GLOBAL"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value> {
        if self.stack.is_empty() {
            return Err(self.err("stack underflow"));
        }
        let n = self.stack.len();
        Ok(&mut self.stack[n - 1])
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let below = self.metastack.pop().ok_or_else(|| self.err("no MARK to pop to"))?;
        Ok(std::mem::replace(&mut self.stack, below))
    }

    pub(super) fn run(mut self) -> Result<Value> {
        loop {
            self.op_at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO: torch.save writes 2; weights_only accepts others with a warning.
                    self.u8()?;
                }
                b'.' => return self.pop(),
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let global = Global::lookup(&module, &name).ok_or_else(|| {
                        TorchFileError::UnsupportedGlobal {
                            path: self.path.to_string(),
                            name: format!("{module}.{name}"),
                        }
                    })?;
                    self.stack.push(Value::Global(global));
                }
                b'q' | b'r' => {
                    let i = if op == b'q' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.memo.get(&i).cloned();
                    let v = v.ok_or_else(|| self.err(format!("memo entry {i} is not set")))?;
                    self.stack.push(v);
                }
                b'(' => self.metastack.push(std::mem::take(&mut self.stack)),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.err("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack.push(Value::Int(le16(b, 0) as i64));
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let v =
                        decode_long(b).ok_or_else(|| self.err("integer does not fit 64 bits"))?;
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    let s = std::str::from_utf8(b).map_err(|_| self.err("string is not UTF-8"))?;
                    self.stack.push(Value::Str(s.to_string()));
                }
                b'U' => {
                    // SHORT_BINSTRING (pickles from Python 2): decoded as text, as torch.load does.
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.stack.push(Value::Str(String::from_utf8_lossy(b).into_owned()));
                }
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b']' => self.stack.push(Value::List(Rc::default())),
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    match self.top()? {
                        Value::List(list) => list.borrow_mut().extend(items),
                        other => {
                            let kind = other.kind();
                            return Err(self.err(format!("can only append to a list, not {kind}")));
                        }
                    }
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        vec![k, v]
                    } else {
                        self.pop_mark()?
                    };
                    if items.len() % 2 != 0 {
                        return Err(self.err("SETITEMS with an odd number of items"));
                    }
                    let dict = match self.top()? {
                        Value::Dict(d) => d.clone(),
                        other => {
                            let kind = other.kind();
                            return Err(
                                self.err(format!("can only set items of a dict, not {kind}"))
                            );
                        }
                    };
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        dict_set(&mut dict.borrow_mut(), k, v);
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let result = self.reduce(func, args)?;
                    self.stack.push(result);
                }
                0x81 => {
                    // NEWOBJ: only `nn.Parameter(tensor, ...)`, as weights_only allows.
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    match (&cls, &args) {
                        (Value::Global(Global::Parameter), Value::Tuple(a))
                            if matches!(a.first(), Some(Value::Tensor(_))) =>
                        {
                            self.stack.push(a[0].clone())
                        }
                        _ => return Err(self.err(format!("NEWOBJ of a {}", cls.kind()))),
                    }
                }
                b'b' => {
                    // BUILD: a state dict's `_metadata`, a Parameter's state: not needed.
                    self.pop()?;
                    let kind = self.top()?.kind();
                    if !matches!(kind, "dict" | "tensor") {
                        return Err(self.err(format!("BUILD of a {kind}")));
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(&pid)?;
                    self.stack.push(Value::Storage(Rc::new(storage)));
                }
                _ => {
                    return Err(self.err(format!(
                        "opcode 0x{op:02x} ({}) is not one a weights_only unpickler accepts",
                        opcode_name(op)
                    )))
                }
            }
        }
    }

    /// `('storage', torch.FloatStorage, key, location, numel)`; the location is ignored, every
    /// storage is read onto the CPU.
    fn persistent_load(&self, pid: &Value) -> Result<StorageRef> {
        let bad = || self.err(format!("persistent id is not a storage id: {pid:?}"));
        let Value::Tuple(t) = pid else { return Err(bad()) };
        let [Value::Str(tag), class, Value::Str(key), Value::Str(_), Value::Int(numel)] =
            t.as_slice()
        else {
            return Err(bad());
        };
        match class {
            Value::Global(Global::Storage(dtype)) if tag == "storage" && *numel >= 0 => {
                Ok(StorageRef { dtype: *dtype, key: key.clone(), numel: *numel as u64 })
            }
            _ => Err(bad()),
        }
    }

    fn reduce(&self, func: Value, args: Value) -> Result<Value> {
        let Value::Tuple(args) = args else {
            return Err(self.err(format!("REDUCE arguments are a {}, not a tuple", args.kind())));
        };
        let Value::Global(global) = func else {
            return Err(self.err(format!("REDUCE of a {}", func.kind())));
        };
        let ints = |v: &Value, what: &str| -> Result<Vec<u64>> {
            let Value::Tuple(t) = v else {
                return Err(self.err(format!("tensor {what} is not a tuple")));
            };
            t.iter()
                .map(|x| match x {
                    Value::Int(i) if *i >= 0 => Ok(*i as u64),
                    _ => Err(self.err(format!("tensor {what} holds {x:?}"))),
                })
                .collect()
        };
        match (global, args.as_slice()) {
            (
                Global::RebuildTensorV2,
                [Value::Storage(s), Value::Int(offset), size, stride, _, _, ..],
            ) if args.len() <= 7 && *offset >= 0 => {
                let (size, stride) = (ints(size, "size")?, ints(stride, "stride")?);
                if size.len() != stride.len() {
                    return Err(self.err(format!(
                        "tensor size {size:?} and stride {stride:?} differ in length"
                    )));
                }
                Ok(Value::Tensor(Rc::new(LazyTensor {
                    storage: s.clone(),
                    offset: *offset as u64,
                    size,
                    stride,
                })))
            }
            (Global::RebuildParameter, [t @ Value::Tensor(_), _, _])
            | (Global::RebuildParameterWithState, [t @ Value::Tensor(_), _, _, _]) => Ok(t.clone()),
            (Global::OrderedDict, []) => Ok(Value::Dict(Rc::default())),
            (Global::OrderedDict, [Value::List(pairs)]) => {
                let mut items = Vec::new();
                for pair in pairs.borrow().iter() {
                    let kv = match pair {
                        Value::Tuple(t) if t.len() == 2 => (t[0].clone(), t[1].clone()),
                        Value::List(l) if l.borrow().len() == 2 => {
                            let l = l.borrow();
                            (l[0].clone(), l[1].clone())
                        }
                        _ => return Err(self.err("OrderedDict() of something other than pairs")),
                    };
                    dict_set(&mut items, kv.0, kv.1);
                }
                Ok(Value::Dict(Rc::new(RefCell::new(items))))
            }
            (Global::Size, [t @ Value::Tuple(_)]) => Ok(t.clone()),
            (g, a) => Err(self.err(format!("cannot rebuild {g:?} from {} arguments", a.len()))),
        }
    }
}

/// Python's `dict[k] = v`: replaces in place, or appends.
fn dict_set(items: &mut Vec<(Value, Value)>, k: Value, v: Value) {
    let same = |a: &Value| match (a, &k) {
        (Value::Str(a), Value::Str(b)) => a == b,
        (Value::Int(a), Value::Int(b)) => a == b,
        _ => false,
    };
    match items.iter_mut().find(|(a, _)| same(a)) {
        Some(slot) => slot.1 = v,
        None => items.push((k, v)),
    }
}

fn decode_long(b: &[u8]) -> Option<i64> {
    if b.is_empty() {
        return Some(0);
    }
    if b.len() > 8 {
        // Wider encodings are fine when the extra bytes are only sign extension.
        let sign = if b[7] & 0x80 != 0 { 0xFF } else { 0 };
        if b[8..].iter().any(|&x| x != sign) {
            return None;
        }
        return decode_long(&b[..8]);
    }
    let fill = if b[b.len() - 1] & 0x80 != 0 { 0xFF } else { 0 };
    let mut a = [fill; 8];
    a[..b.len()].copy_from_slice(b);
    Some(i64::from_le_bytes(a))
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        b'B' | b'C' | 0x8e | 0x96 => "bytes",
        b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'i' | b'o' | b'p' | b'g' | b'd' | b'l' => {
            "protocol 0/1"
        }
        _ => "unknown",
    }
}
