//! Just enough of the ONNX protobuf to rewrite a model in place: a generic wire-format reader and
//! writer (fields we do not touch are carried through byte for byte), plus the ModelProto /
//! GraphProto / NodeProto / TensorProto fields `ssrl export` edits — LoRA merging into the base
//! weights and fp16 weight storage. Weights in external data files (models over protobuf's 2 GB
//! limit) are read in when a graph is opened from its file and written out again by
//! [`Graph::save`].

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("ONNX protobuf: {0}")]
pub struct ProtoError(pub String);

fn perr<T>(msg: impl Into<String>) -> Result<T, ProtoError> {
    Err(ProtoError(msg.into()))
}

/// One field of a message, in wire order.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Varint(u64),
    Fixed64(u64),
    Bytes(Vec<u8>),
    Fixed32(u32),
}

pub type Message = Vec<(u32, Value)>;

fn varint(b: &[u8], at: &mut usize) -> Result<u64, ProtoError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&byte) = b.get(*at) else {
            return perr("truncated varint");
        };
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    perr("varint longer than 10 bytes")
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn parse(b: &[u8]) -> Result<Message, ProtoError> {
    let (mut at, mut out) = (0usize, Vec::new());
    while at < b.len() {
        let key = varint(b, &mut at)?;
        let (field, wire) = ((key >> 3) as u32, key & 7);
        let take = |at: &mut usize, n: usize| -> Result<&[u8], ProtoError> {
            let s = b
                .get(*at..at.saturating_add(n))
                .ok_or_else(|| ProtoError(format!("field {field} runs past the end")))?;
            *at += n;
            Ok(s)
        };
        let v = match wire {
            0 => Value::Varint(varint(b, &mut at)?),
            1 => Value::Fixed64(u64::from_le_bytes(take(&mut at, 8)?.try_into().expect("8"))),
            2 => {
                let n = varint(b, &mut at)? as usize;
                Value::Bytes(take(&mut at, n)?.to_vec())
            }
            5 => Value::Fixed32(u32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4"))),
            w => return perr(format!("field {field}: wire type {w} not supported")),
        };
        out.push((field, v));
    }
    Ok(out)
}

pub fn write(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    for (field, v) in m {
        let wire = match v {
            Value::Varint(_) => 0,
            Value::Fixed64(_) => 1,
            Value::Bytes(_) => 2,
            Value::Fixed32(_) => 5,
        };
        put_varint(&mut out, (u64::from(*field) << 3) | wire);
        match v {
            Value::Varint(x) => put_varint(&mut out, *x),
            Value::Fixed64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bytes(x) => {
                put_varint(&mut out, x.len() as u64);
                out.extend_from_slice(x);
            }
            Value::Fixed32(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
    out
}

fn string(v: &Value) -> Option<String> {
    match v {
        Value::Bytes(b) => String::from_utf8(b.clone()).ok(),
        _ => None,
    }
}

// Field numbers (onnx.proto3).
const MODEL_GRAPH: u32 = 7;
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
const GRAPH_INPUT: u32 = 11;
const NODE_INPUT: u32 = 1;
const NODE_OUTPUT: u32 = 2;
const NODE_NAME: u32 = 3;
const NODE_OP: u32 = 4;
const NODE_ATTRIBUTE: u32 = 5;
const TENSOR_DIMS: u32 = 1;
const TENSOR_TYPE: u32 = 2;
const TENSOR_FLOATS: u32 = 4;
const TENSOR_NAME: u32 = 8;
const TENSOR_RAW: u32 = 9;
const TENSOR_EXTERNAL: u32 = 13;
const TENSOR_LOCATION: u32 = 14;
/// TensorProto.DataLocation.EXTERNAL.
const EXTERNAL: u64 = 1;
const FLOAT: u64 = 1;
const FLOAT16: u64 = 10;

/// LoRA factors by package name (`lora.0.q_proj`): (A [r, in], B [out, r]) row-major.
pub type Adapter = HashMap<String, (Vec<f32>, Vec<f32>)>;

/// A graph opened for editing: nodes and initializers parsed, everything else kept as is.
pub struct Graph {
    model: Message,
    graph: Message,
    pub nodes: Vec<Node>,
    pub initializers: Vec<Tensor>,
    /// Bytes of weights read from external data files ([`Graph::open_file`]), and the files.
    pub external_bytes: u64,
    pub external_files: std::collections::BTreeSet<String>,
}

/// Where an external tensor's bytes lie: `length` bytes (to the end when absent) at `offset` of
/// the file `location`, relative to the model's folder.
#[derive(Debug, Clone, PartialEq)]
struct ExternalRef {
    location: String,
    offset: u64,
    length: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub op: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    rest: Message,
}

#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<usize>,
    /// ONNX TensorProto.DataType.
    pub data_type: u64,
    pub raw: Vec<u8>,
    /// Set while the bytes are still in an external file (a graph opened from bytes alone).
    external: Option<ExternalRef>,
    rest: Message,
}

impl Tensor {
    pub fn floats(&self) -> Option<Vec<f32>> {
        (self.data_type == FLOAT).then(|| {
            self.raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                .collect()
        })
    }
    pub fn set_floats(&mut self, v: &[f32]) {
        self.data_type = FLOAT;
        self.raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    }
    /// The values of a float32 or float16 tensor, as f32.
    pub fn values(&self) -> Option<Vec<f32>> {
        match self.data_type {
            FLOAT16 => Some(
                (self.raw.chunks_exact(2))
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            _ => self.floats(),
        }
    }
    /// Stores `v` in the tensor's own type: float16 stays float16, anything else becomes
    /// float32.
    pub fn set_values(&mut self, v: &[f32]) {
        if self.data_type == FLOAT16 {
            self.raw = (v.iter())
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect();
        } else {
            self.set_floats(v);
        }
    }
}

impl Node {
    /// An INT attribute's value.
    pub fn int_attr(&self, name: &str) -> Option<i64> {
        self.rest
            .iter()
            .filter(|(f, _)| *f == NODE_ATTRIBUTE)
            .filter_map(|(_, v)| match v {
                Value::Bytes(b) => parse(b).ok(),
                _ => None,
            })
            .find(|a| {
                a.iter()
                    .any(|(f, v)| *f == 1 && string(v).as_deref() == Some(name))
            })
            .and_then(|a| {
                a.into_iter().find_map(|(f, v)| match (f, v) {
                    (3, Value::Varint(i)) => Some(i as i64),
                    _ => None,
                })
            })
    }
}

fn parse_node(b: &[u8]) -> Result<Node, ProtoError> {
    let mut n = Node {
        op: String::new(),
        inputs: vec![],
        outputs: vec![],
        rest: vec![],
    };
    for (f, v) in parse(b)? {
        match f {
            NODE_INPUT => n.inputs.push(string(&v).unwrap_or_default()),
            NODE_OUTPUT => n.outputs.push(string(&v).unwrap_or_default()),
            NODE_OP => n.op = string(&v).unwrap_or_default(),
            _ => n.rest.push((f, v)),
        }
    }
    Ok(n)
}

fn write_node(n: &Node) -> Vec<u8> {
    let mut m: Message = Vec::new();
    m.extend(
        n.inputs
            .iter()
            .map(|s| (NODE_INPUT, Value::Bytes(s.as_bytes().to_vec()))),
    );
    m.extend(
        n.outputs
            .iter()
            .map(|s| (NODE_OUTPUT, Value::Bytes(s.as_bytes().to_vec()))),
    );
    m.push((NODE_OP, Value::Bytes(n.op.as_bytes().to_vec())));
    m.extend(n.rest.iter().cloned());
    write(&m)
}

fn parse_tensor(b: &[u8]) -> Result<Tensor, ProtoError> {
    let mut t = Tensor {
        name: String::new(),
        dims: vec![],
        data_type: 0,
        raw: vec![],
        external: None,
        rest: vec![],
    };
    let mut floats = Vec::new();
    let (mut entries, mut location) = (Vec::new(), 0);
    for (f, v) in parse(b)? {
        match (f, &v) {
            (TENSOR_DIMS, Value::Varint(d)) => t.dims.push(*d as usize),
            (TENSOR_DIMS, Value::Bytes(packed)) => {
                let mut at = 0;
                while at < packed.len() {
                    t.dims.push(varint(packed, &mut at)? as usize);
                }
            }
            (TENSOR_TYPE, Value::Varint(d)) => t.data_type = *d,
            (TENSOR_NAME, _) => t.name = string(&v).unwrap_or_default(),
            (TENSOR_RAW, Value::Bytes(r)) => t.raw = r.clone(),
            (TENSOR_FLOATS, Value::Bytes(packed)) => floats.extend_from_slice(packed),
            (TENSOR_FLOATS, Value::Fixed32(x)) => floats.extend_from_slice(&x.to_le_bytes()),
            (TENSOR_EXTERNAL, Value::Bytes(e)) => {
                // StringStringEntryProto: key = 1, value = 2.
                let e = parse(e)?;
                let get = |k: u32| e.iter().find(|(f, _)| *f == k).and_then(|(_, v)| string(v));
                entries.push((get(1).unwrap_or_default(), get(2).unwrap_or_default()));
            }
            (TENSOR_LOCATION, Value::Varint(l)) => location = *l,
            _ => t.rest.push((f, v)),
        }
    }
    if t.raw.is_empty() && !floats.is_empty() {
        t.raw = floats;
    }
    if location == EXTERNAL {
        let name = t.name.clone();
        let get = |k: &str| entries.iter().find(|(key, _)| key == k).map(|(_, v)| v);
        let number = |k: &str| -> Result<Option<u64>, ProtoError> {
            get(k)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| ProtoError(format!("{name}: external data {k} {v:?}")))
                })
                .transpose()
        };
        let Some(loc) = get("location") else {
            return perr(format!("{name}: external data without a location"));
        };
        t.external = Some(ExternalRef {
            location: loc.clone(),
            offset: number("offset")?.unwrap_or(0),
            length: number("length")?,
        });
    }
    Ok(t)
}

/// The tensor's protobuf: its bytes inline, or a reference to where they lie in an external
/// file (`external`, else the tensor's own reference when its bytes were never read).
fn write_tensor(t: &Tensor, external: Option<&ExternalRef>) -> Vec<u8> {
    let mut m: Message = t
        .dims
        .iter()
        .map(|d| (TENSOR_DIMS, Value::Varint(*d as u64)))
        .collect();
    m.push((TENSOR_TYPE, Value::Varint(t.data_type)));
    m.push((TENSOR_NAME, Value::Bytes(t.name.as_bytes().to_vec())));
    match external.or(t.external.as_ref()) {
        None => m.push((TENSOR_RAW, Value::Bytes(t.raw.clone()))),
        Some(e) => {
            let entry = |k: &str, v: String| {
                let kv = vec![
                    (1, Value::Bytes(k.as_bytes().to_vec())),
                    (2, Value::Bytes(v.into_bytes())),
                ];
                (TENSOR_EXTERNAL, Value::Bytes(write(&kv)))
            };
            m.push(entry("location", e.location.clone()));
            m.push(entry("offset", e.offset.to_string()));
            if let Some(l) = e.length {
                m.push(entry("length", l.to_string()));
            }
            m.push((TENSOR_LOCATION, Value::Varint(EXTERNAL)));
        }
    }
    m.extend(t.rest.iter().cloned());
    write(&m)
}

/// The bytes of the model at `path` with its weights: the file and the bytes of the tensors it
/// reads from external data files (each once; a file the package's graphs share counts only for
/// what this graph reads; a tensor whose length is not given counts to the end of its file, 0
/// for what cannot be read). A file over 64 MB is taken to hold its weights itself and is not
/// read (exporters that write external data leave only small tensors inline).
pub fn size_with_data(path: &Path) -> u64 {
    let own = std::fs::metadata(path).map_or(0, |m| m.len());
    if own > 64 << 20 {
        return own;
    }
    let Some(tensors) = std::fs::read(path)
        .ok()
        .and_then(|b| external_initializers(&b).ok())
    else {
        return own;
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut seen = std::collections::BTreeSet::new();
    let mut total = own;
    for t in tensors {
        if !seen.insert((t.location.clone(), t.offset)) {
            continue;
        }
        total += match t.length {
            Some(n) => n,
            None => std::fs::metadata(dir.join(&t.location))
                .map_or(0, |m| m.len().saturating_sub(t.offset)),
        };
    }
    total
}

/// The data file the graphs of a package share (models/export.py and `ssrl export` write it).
pub const WEIGHTS_FILE: &str = "weights.data";

/// A package's one external data file, written as its graphs are saved
/// ([`Graph::save`]): each tensor at a 4 KiB-aligned offset (so ONNX Runtime and the runtime can
/// map it), and a tensor with the same type, shape and bytes as one already written is stored
/// once whichever graphs hold it.
pub struct DataFile {
    path: std::path::PathBuf,
    location: String,
    file: std::fs::File,
    at: u64,
    /// By (type, shape, content hash): where the tensors with them lie.
    stored: HashMap<ContentKey, Vec<(u64, u64)>>,
}

/// A tensor's type, shape and content hash.
type ContentKey = (u64, Vec<usize>, u64);

impl DataFile {
    /// Creates (or truncates) `path`; graphs name it by its file name.
    pub fn create(path: &Path) -> Result<DataFile, ProtoError> {
        let io = |e: std::io::Error| ProtoError(format!("{}: {e}", path.display()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io)?;
        Ok(DataFile {
            path: path.to_path_buf(),
            location: path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into()),
            file,
            at: 0,
            stored: HashMap::new(),
        })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.at
    }

    pub fn is_empty(&self) -> bool {
        self.at == 0
    }

    fn io(&self) -> impl Fn(std::io::Error) -> ProtoError + '_ {
        |e| ProtoError(format!("{}: {e}", self.path.display()))
    }

    /// Where `t`'s bytes lie in the file: an equal tensor's place, or appended.
    fn put(&mut self, t: &Tensor) -> Result<ExternalRef, ProtoError> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        t.raw.hash(&mut h);
        let key = (t.data_type, t.dims.clone(), h.finish());
        let len = t.raw.len() as u64;
        for &(offset, n) in self.stored.get(&key).into_iter().flatten() {
            // Equal only when the bytes are: read back what lies there.
            let mut there = vec![0u8; n as usize];
            self.file
                .seek(SeekFrom::Start(offset))
                .and_then(|_| self.file.read_exact(&mut there))
                .map_err(self.io())?;
            if there == t.raw {
                return Ok(ExternalRef {
                    location: self.location.clone(),
                    offset,
                    length: Some(n),
                });
            }
        }
        let offset = self.at.div_ceil(4096) * 4096;
        self.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.write_all(&t.raw))
            .map_err(self.io())?;
        self.at = offset + len;
        self.stored.entry(key).or_default().push((offset, len));
        Ok(ExternalRef {
            location: self.location.clone(),
            offset,
            length: Some(len),
        })
    }

    fn flush(&mut self) -> Result<(), ProtoError> {
        self.file.flush().map_err(self.io())
    }
}

/// An initializer whose bytes lie in an external data file.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalTensor {
    pub name: String,
    pub dims: Vec<usize>,
    /// ONNX TensorProto.DataType.
    pub data_type: u64,
    /// The file, relative to the model's folder, and where in it.
    pub location: String,
    pub offset: u64,
    /// To the end of the file when absent.
    pub length: Option<u64>,
}

/// The model's initializers kept in external data files, read from the model's bytes alone.
pub fn external_initializers(model: &[u8]) -> Result<Vec<ExternalTensor>, ProtoError> {
    let g = Graph::open(model)?;
    Ok(g.initializers
        .into_iter()
        .filter_map(|t| {
            let e = t.external?;
            Some(ExternalTensor {
                name: t.name,
                dims: t.dims,
                data_type: t.data_type,
                location: e.location,
                offset: e.offset,
                length: e.length,
            })
        })
        .collect())
}

/// The element type of the model's graph input `name` (ONNX's code: 1 float, 10 float16, 16
/// bfloat16, 7 int64), where it is a tensor. Only the inputs are read: weights may be in
/// external files.
pub fn input_elem_type(model: &[u8], name: &str) -> Option<i64> {
    let field = |b: &[u8], f: u32| -> Option<Vec<u8>> {
        parse(b).ok()?.into_iter().find_map(|(k, v)| match v {
            Value::Bytes(b) if k == f => Some(b),
            _ => None,
        })
    };
    let graph = field(model, MODEL_GRAPH)?;
    parse(&graph).ok()?.into_iter().find_map(|(f, v)| {
        let Value::Bytes(info) = v else { return None };
        if f != GRAPH_INPUT || field(&info, 1).and_then(|n| String::from_utf8(n).ok())? != name {
            return None;
        }
        // ValueInfoProto.type → TypeProto.tensor_type → elem_type.
        let tensor = field(&field(&info, 2)?, 1)?;
        parse(&tensor).ok()?.into_iter().find_map(|(k, v)| match v {
            Value::Varint(t) if k == 1 => Some(t as i64),
            _ => None,
        })
    })
}

impl Graph {
    pub fn open(bytes: &[u8]) -> Result<Graph, ProtoError> {
        let model = parse(bytes)?;
        let Some((_, Value::Bytes(g))) = model.iter().find(|(f, _)| *f == MODEL_GRAPH) else {
            return perr("no graph in the model");
        };
        let mut graph = Vec::new();
        let (mut nodes, mut initializers) = (Vec::new(), Vec::new());
        for (f, v) in parse(g)? {
            match (f, &v) {
                (GRAPH_NODE, Value::Bytes(b)) => nodes.push(parse_node(b)?),
                (GRAPH_INITIALIZER, Value::Bytes(b)) => initializers.push(parse_tensor(b)?),
                _ => graph.push((f, v)),
            }
        }
        Ok(Graph {
            model,
            graph,
            nodes,
            initializers,
            external_bytes: 0,
            external_files: Default::default(),
        })
    }

    /// Opens the model at `path` with every weight in memory: tensors in external data files
    /// (relative to the model's folder, as ONNX writes them) are read in.
    pub fn open_file(path: &Path) -> Result<Graph, ProtoError> {
        let bytes = std::fs::read(path).map_err(|e| ProtoError(e.to_string()))?;
        let mut g = Graph::open(&bytes)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut files: HashMap<String, std::fs::File> = HashMap::new();
        for t in &mut g.initializers {
            let Some(e) = t.external.take() else { continue };
            let bad = |msg: String| ProtoError(format!("{}: external data {msg}", t.name));
            let rel = Path::new(&e.location);
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
            {
                return Err(bad(format!(
                    "{:?} lies outside the model's folder",
                    e.location
                )));
            }
            let file = match files.entry(e.location.clone()) {
                std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let f = std::fs::File::open(dir.join(rel))
                        .map_err(|err| bad(format!("{}: {err}", dir.join(rel).display())))?;
                    v.insert(f)
                }
            };
            let size = file.metadata().map_err(|err| bad(err.to_string()))?.len();
            let length = e.length.unwrap_or(size.saturating_sub(e.offset));
            if e.offset.checked_add(length).is_none_or(|end| end > size) {
                return Err(bad(format!(
                    "{}: {length} bytes at {} run past its end ({size} bytes)",
                    e.location, e.offset
                )));
            }
            let mut raw = vec![0u8; length as usize];
            file.seek(SeekFrom::Start(e.offset))
                .and_then(|_| file.read_exact(&mut raw))
                .map_err(|err| bad(format!("{}: {err}", e.location)))?;
            t.raw = raw;
            g.external_bytes += length;
            g.external_files.insert(e.location);
        }
        // Tensors inside node attributes (a Constant's value) are kept as they are: one in an
        // external file would name a file the rewritten model no longer has.
        for n in &g.nodes {
            for (_, v) in n.rest.iter().filter(|(f, _)| *f == NODE_ATTRIBUTE) {
                let Value::Bytes(a) = v else { continue };
                for (f, t) in parse(a)? {
                    // AttributeProto.t = 5, .tensors = 11.
                    let (5 | 11, Value::Bytes(t)) = (f, t) else {
                        continue;
                    };
                    if parse_tensor(&t)?.external.is_some() {
                        let name = n.rest.iter().find(|(f, _)| *f == NODE_NAME);
                        let name = name.and_then(|(_, v)| string(v)).unwrap_or_default();
                        return perr(format!(
                            "node {name} ({}): a tensor attribute in an external data file is \
                             not supported (only initializers are read in)",
                            n.op
                        ));
                    }
                }
            }
        }
        Ok(g)
    }

    /// Whether the graph must keep its weights in an external file: it came with one, or its
    /// weights exceed what one protobuf may hold (2 GB, less a margin for the graph itself).
    pub fn needs_external(&self) -> bool {
        let weights: usize = self.initializers.iter().map(|t| t.raw.len()).sum();
        !self.external_files.is_empty() || weights > 1_800_000_000
    }

    /// Writes the model to `path`: every weight of at least 1 KiB in `data` when given (the
    /// package's one data file, shared by its graphs: a tensor already there is not written
    /// again), else all inline.
    pub fn save(&self, path: &Path, data: Option<&mut DataFile>) -> Result<(), ProtoError> {
        let io = |e: std::io::Error| ProtoError(format!("{}: {e}", path.display()));
        let Some(data) = data else {
            return std::fs::write(path, self.to_bytes_with(|_| None)).map_err(io);
        };
        let mut failed = None;
        let bytes = self.to_bytes_with(|t| {
            if t.raw.len() < 1024 || failed.is_some() {
                return None;
            }
            match data.put(t) {
                Ok(e) => Some(e),
                Err(e) => {
                    failed = Some(e);
                    None
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        data.flush()?;
        std::fs::write(path, bytes).map_err(io)
    }

    /// Graph input names.
    pub fn inputs(&self) -> Vec<String> {
        self.graph
            .iter()
            .filter(|(f, _)| *f == GRAPH_INPUT)
            .filter_map(|(_, v)| match v {
                Value::Bytes(b) => parse(b)
                    .ok()?
                    .into_iter()
                    .find(|(f, _)| *f == 1)
                    .and_then(|(_, v)| string(&v)),
                _ => None,
            })
            .collect()
    }

    pub fn initializer(&self, name: &str) -> Option<&Tensor> {
        self.initializers.iter().find(|t| t.name == name)
    }

    pub fn initializer_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.initializers.iter_mut().find(|t| t.name == name)
    }

    /// The model's protobuf, each initializer inline or where `place` puts it.
    fn to_bytes_with(&self, mut place: impl FnMut(&Tensor) -> Option<ExternalRef>) -> Vec<u8> {
        let mut g: Message = self.graph.clone();
        // Nodes first (topological order kept), then initializers, then the rest.
        let mut out: Message = self
            .nodes
            .iter()
            .map(|n| (GRAPH_NODE, Value::Bytes(write_node(n))))
            .collect();
        out.extend(self.initializers.iter().map(|t| {
            let e = place(t);
            (GRAPH_INITIALIZER, Value::Bytes(write_tensor(t, e.as_ref())))
        }));
        out.append(&mut g);
        let mut model = self.model.clone();
        for (f, v) in model.iter_mut() {
            if *f == MODEL_GRAPH {
                *v = Value::Bytes(write(&out));
            }
        }
        write(&model)
    }

    /// Stores every float initializer of at least `min_elements` values that is not a graph
    /// input as fp16, read back through a Cast to float (half the bytes, fp32 arithmetic).
    /// Returns how many were converted.
    pub fn store_weights_fp16(&mut self, min_elements: usize) -> usize {
        let inputs: std::collections::HashSet<String> = self.inputs().into_iter().collect();
        let mut casts = Vec::new();
        for t in &mut self.initializers {
            let n: usize = t.dims.iter().product();
            if t.data_type != FLOAT || n < min_elements || inputs.contains(&t.name) {
                continue;
            }
            let values = t.floats().expect("a float32 tensor");
            let original = std::mem::take(&mut t.name);
            t.name = format!("{original}__fp16");
            t.data_type = FLOAT16;
            t.set_values(&values);
            let to = vec![
                (1, Value::Bytes(b"to".to_vec())),
                (3, Value::Varint(FLOAT)),
                (20, Value::Varint(2)),
            ];
            casts.push(Node {
                op: "Cast".into(),
                inputs: vec![t.name.clone()],
                outputs: vec![original.clone()],
                rest: vec![
                    (
                        NODE_NAME,
                        Value::Bytes(format!("{original}__cast").into_bytes()),
                    ),
                    (NODE_ATTRIBUTE, Value::Bytes(write(&to))),
                ],
            });
        }
        let n = casts.len();
        casts.append(&mut self.nodes);
        self.nodes = casts;
        n
    }

    /// Folds LoRA into the base weights. For each adapter pair `{name}.A` [r, in] / `{name}.B`
    /// [out, r] this graph takes as inputs, follows the exporter's LoRA branch
    /// `Mul(MatMul(MatMul(x, Aᵀ), Bᵀ), scale)` (reshapes allowed in between) to the `Add` that
    /// joins it to the base projection, walks the base side back (through reshapes and the bias)
    /// to `MatMul(·, W)` — W an initializer stored `[in, out]`, or `Transpose` of one stored
    /// `[out, in]`; or `Gemm` / `FusedMatMul` with `transB` — and sets `W += scale · Aᵀ Bᵀ`. The graph's own LoRA defaults become zero.
    /// Returns the merged names.
    pub fn merge_lora(&mut self, adapter: &Adapter, scale: f32) -> Result<Vec<String>, ProtoError> {
        Ok(self
            .merge_lora_weights(adapter, scale)?
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    /// [`Graph::merge_lora`], returning each merged adapter name with the weight it went into.
    pub fn merge_lora_weights(
        &mut self,
        adapter: &Adapter,
        scale: f32,
    ) -> Result<Vec<(String, String)>, ProtoError> {
        let producer: HashMap<String, usize> = self
            .nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.clone(), i)))
            .collect();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for inp in &n.inputs {
                consumers.entry(inp.as_str()).or_default().push(i);
            }
        }
        let nodes = &self.nodes;
        let users = |name: &str, op: &str| -> Vec<usize> {
            consumers
                .get(name)
                .map(|v| v.iter().copied().filter(|&i| nodes[i].op == op).collect())
                .unwrap_or_default()
        };
        // Follows `name` forward through Reshapes to the first consumer with op `op`.
        let forward = |mut name: String, op: &str| -> Option<usize> {
            for _ in 0..4 {
                if let Some(&i) = users(&name, op).first() {
                    return Some(i);
                }
                name = nodes[*users(&name, "Reshape").first()?].outputs[0].clone();
            }
            None
        };
        let consts: std::collections::HashSet<&str> =
            self.initializers.iter().map(|t| t.name.as_str()).collect();
        let is_const = |name: &str| consts.contains(name);
        let inputs = self.inputs();
        let mut names: Vec<&String> = adapter.keys().collect();
        names.sort();
        let mut merged = Vec::new();
        let mut updates: Vec<(String, Vec<f32>)> = Vec::new();
        for name in names {
            let (a_name, b_name) = (format!("{name}.A"), format!("{name}.B"));
            if !inputs.contains(&a_name) {
                continue;
            }
            let ctx = |m: &str| ProtoError(format!("{name}: {m}"));
            // x·Mᵀ: MatMul(x, Transpose(M)) (3-D activations, the language model), or
            // Gemm(x, M) with transB and no bias (2-D ones, the vision tower).
            let times_t = |m: &str| -> Option<usize> {
                if let Some(&t) = users(m, "Transpose").first() {
                    let mt = &nodes[t].outputs[0];
                    return users(mt, "MatMul")
                        .into_iter()
                        .find(|&i| nodes[i].inputs.get(1) == Some(mt));
                }
                users(m, "Gemm").into_iter().find(|&i| {
                    let n = &nodes[i];
                    n.inputs.get(1).map(String::as_str) == Some(m)
                        && n.inputs.len() == 2
                        && n.int_attr("transB") == Some(1)
                        && n.int_attr("transA").unwrap_or(0) == 0
                })
            };
            times_t(&a_name).ok_or_else(|| ctx("no MatMul(x, Aᵀ) or Gemm(x, A, transB)"))?;
            let m2 =
                times_t(&b_name).ok_or_else(|| ctx("no MatMul(·, Bᵀ) or Gemm(·, B, transB)"))?;
            let mul =
                forward(nodes[m2].outputs[0].clone(), "Mul").ok_or_else(|| ctx("no scale Mul"))?;
            let add =
                forward(nodes[mul].outputs[0].clone(), "Add").ok_or_else(|| ctx("no LoRA Add"))?;
            let lora_out = &nodes[mul].outputs[0];
            let mut base = nodes[add]
                .inputs
                .iter()
                .find(|i| {
                    // Not the LoRA side: that one leads back to the scale Mul through reshapes.
                    let mut name = (*i).clone();
                    for _ in 0..4 {
                        if name == *lora_out {
                            return false;
                        }
                        match producer.get(&name).map(|&p| &nodes[p]) {
                            Some(p) if p.op == "Reshape" => name = p.inputs[0].clone(),
                            _ => return true,
                        }
                    }
                    true
                })
                .cloned()
                .ok_or_else(|| ctx("no base branch"))?;
            let mut weight = None;
            for _ in 0..6 {
                let p = &nodes[*producer
                    .get(&base)
                    .ok_or_else(|| ctx("base has no producer"))?];
                match p.op.as_str() {
                    "MatMul" => {
                        weight = Some((p.inputs[1].clone(), false));
                        break;
                    }
                    // Gemm(x, W, bias), and FusedMatMul(x, W) (the training graph reads its
                    // weights in place): W is [out, in] when transB = 1.
                    "Gemm" | "FusedMatMul" if p.int_attr("transA").unwrap_or(0) == 0 => {
                        weight = Some((p.inputs[1].clone(), p.int_attr("transB") == Some(1)));
                        break;
                    }
                    "Reshape" | "Identity" | "Cast" => base = p.inputs[0].clone(),
                    "Add" => {
                        base = p
                            .inputs
                            .iter()
                            .find(|i| !is_const(i))
                            .cloned()
                            .ok_or_else(|| ctx("bias Add without a data input"))?
                    }
                    other => {
                        return Err(ctx(&format!(
                            "unexpected {other} under the base projection"
                        )))
                    }
                }
            }
            let (w_in, flip) = weight.ok_or_else(|| ctx("no base MatMul"))?;
            // W [in, out] directly, or Transpose(W [out, in]); a Gemm's transB flips it again.
            // Either may be stored in fp16 and widened by a Cast to float where it is used.
            let stored = |name: &String| -> Option<String> {
                if is_const(name) {
                    return Some(name.clone());
                }
                let p = &nodes[*producer.get(name)?];
                (p.op == "Cast" && p.int_attr("to") == Some(FLOAT as i64) && is_const(&p.inputs[0]))
                    .then(|| p.inputs[0].clone())
            };
            let (w_name, transposed) = match stored(&w_in) {
                Some(w) => (w, flip),
                None => {
                    let p = &nodes[*producer
                        .get(&w_in)
                        .ok_or_else(|| ctx("W has no producer"))?];
                    match (p.op == "Transpose")
                        .then(|| stored(&p.inputs[0]))
                        .flatten()
                    {
                        Some(w) => (w, !flip),
                        None => {
                            return Err(ctx("W is neither an initializer nor its transpose"));
                        }
                    }
                }
            };
            let w = self
                .initializer(&w_name)
                .ok_or_else(|| ctx("W not found"))?;
            let (inp, out) = match (w.dims.as_slice(), transposed) {
                ([i, o], false) => (*i, *o),
                ([o, i], true) => (*i, *o),
                (d, _) => return Err(ctx(&format!("W has shape {d:?}"))),
            };
            let mut wv = w
                .values()
                .ok_or_else(|| ctx("W is neither float32 nor float16"))?;
            let (a, b) = &adapter[name];
            let r = a.len() / inp.max(1);
            if r == 0 || a.len() != r * inp || b.len() != out * r {
                return Err(ctx(&format!(
                    "adapter A has {} and B {} values, which do not fit W [{inp}, {out}]",
                    a.len(),
                    b.len()
                )));
            }
            for i in 0..inp {
                for o in 0..out {
                    let mut acc = 0f64;
                    for k in 0..r {
                        acc += f64::from(a[k * inp + i]) * f64::from(b[o * r + k]);
                    }
                    let at = if transposed { o * inp + i } else { i * out + o };
                    wv[at] += (f64::from(scale) * acc) as f32;
                }
            }
            updates.push((w_name.clone(), wv));
            for n in [a_name, b_name] {
                if let Some(t) = self.initializer(&n) {
                    updates.push((n, vec![0f32; t.dims.iter().product()]));
                }
            }
            merged.push((name.clone(), w_name));
        }
        for (n, v) in updates {
            self.initializer_mut(&n)
                .expect("found above")
                .set_values(&v);
        }
        Ok(merged)
    }

    /// Merges by weight name what another graph of the package merged by pattern: for each
    /// adapter name in `merged` (name → the weight it went into there, with its merged values)
    /// that this graph takes as inputs, the weight of that name gets those values and the LoRA
    /// defaults become zero. For a graph whose LoRA branch the exporter's optimiser pruned
    /// where only the backward pass reads the weight (vision_grad.onnx's last projection).
    /// Returns the merged names; an input whose weight this graph lacks is an error.
    pub fn merge_lora_by_name(
        &mut self,
        merged: &HashMap<String, (String, Vec<f32>)>,
    ) -> Result<Vec<String>, ProtoError> {
        let inputs = self.inputs();
        let mut names: Vec<&String> = merged
            .keys()
            .filter(|n| inputs.contains(&format!("{n}.A")))
            .collect();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            let (w, values) = &merged[name];
            // The weight by its name, and the other layout's (`….T`: [in, out]) transposed,
            // whichever the graph holds.
            let other = match w.strip_suffix(".T") {
                Some(base) => base.to_string(),
                None => format!("{w}.T"),
            };
            let mut found = false;
            if let Some(t) = self.initializer_mut(w) {
                t.set_values(values);
                found = true;
            }
            if let Some(t) = self.initializer_mut(&other) {
                let (rows, cols) = match t.dims[..] {
                    [r, c] if r * c == values.len() => (r, c),
                    _ => {
                        return Err(ProtoError(format!(
                            "{name}: {other} has shape {:?}",
                            t.dims
                        )))
                    }
                };
                // t is [rows, cols]; values are its transpose, [cols, rows].
                let mut v = vec![0f32; values.len()];
                for i in 0..rows {
                    for j in 0..cols {
                        v[i * cols + j] = values[j * rows + i];
                    }
                }
                t.set_values(&v);
                found = true;
            }
            if !found {
                return Err(ProtoError(format!("{name}: no weight {w} in this graph")));
            }
            for ab in ["A", "B"] {
                if let Some(t) = self.initializer_mut(&format!("{name}.{ab}")) {
                    let n = t.dims.iter().product::<usize>();
                    t.set_values(&vec![0f32; n]);
                }
            }
            out.push(name.clone());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model of one Constant node and one initializer, each tensor with its bytes at
    /// `location` in an external file (none when `None`).
    fn model(init_location: Option<&str>, const_location: Option<&str>) -> Vec<u8> {
        let tensor = |name: &str, location: Option<&str>| {
            let t = Tensor {
                name: name.into(),
                dims: vec![2],
                data_type: FLOAT,
                raw: vec![0; 8],
                external: location.map(|l| ExternalRef {
                    location: l.into(),
                    offset: 0,
                    length: Some(8),
                }),
                rest: vec![],
            };
            write_tensor(&t, None)
        };
        let attr = write(&vec![
            (1, Value::Bytes(b"value".to_vec())),
            (5, Value::Bytes(tensor("c", const_location))),
        ]);
        let node = write(&vec![
            (NODE_OUTPUT, Value::Bytes(b"c".to_vec())),
            (NODE_NAME, Value::Bytes(b"const_0".to_vec())),
            (NODE_OP, Value::Bytes(b"Constant".to_vec())),
            (NODE_ATTRIBUTE, Value::Bytes(attr)),
        ]);
        let graph = write(&vec![
            (GRAPH_NODE, Value::Bytes(node)),
            (GRAPH_INITIALIZER, Value::Bytes(tensor("w", init_location))),
        ]);
        write(&vec![(MODEL_GRAPH, Value::Bytes(graph))])
    }

    /// External data is read from inside the model's folder only, and a tensor attribute in an
    /// external file (which a rewrite would orphan) is refused, naming the node.
    /// Two graphs saved into one data file: a tensor equal to one written (type, shape and
    /// bytes) is stored once, whichever graph holds it; one that differs only in shape or bytes
    /// gets its own place; every place is 4 KiB-aligned and reads back as written.
    #[test]
    fn a_shared_data_file_stores_each_tensor_once() {
        let dir = std::env::temp_dir().join(format!("ssrl-data-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tensor = |name: &str, dims: Vec<usize>, byte: u8| Tensor {
            name: name.into(),
            data_type: FLOAT,
            raw: vec![byte; 4 * dims.iter().product::<usize>()],
            dims,
            external: None,
            rest: vec![],
        };
        let graph = |inits: Vec<Tensor>| {
            let mut g = Graph::open(&model(None, None)).unwrap();
            g.initializers = inits;
            g
        };
        let mut data = DataFile::create(&dir.join(WEIGHTS_FILE)).unwrap();
        let a = graph(vec![
            tensor("w", vec![16, 32], 1),
            tensor("small", vec![4], 9),
        ]);
        a.save(&dir.join("a.onnx"), Some(&mut data)).unwrap();
        let b = graph(vec![
            tensor("same_bytes_other_name", vec![16, 32], 1),
            tensor("other_shape", vec![32, 16], 1),
            tensor("other_bytes", vec![16, 32], 2),
        ]);
        b.save(&dir.join("b.onnx"), Some(&mut data)).unwrap();
        assert_eq!(data.len(), 2 * 4096 + 2048);
        let place = |file: &str| -> Vec<(String, u64)> {
            external_initializers(&std::fs::read(dir.join(file)).unwrap())
                .unwrap()
                .into_iter()
                .map(|t| (t.name, t.offset))
                .collect()
        };
        assert_eq!(place("a.onnx"), [("w".to_string(), 0)]);
        assert_eq!(
            place("b.onnx"),
            [
                ("same_bytes_other_name".to_string(), 0),
                ("other_shape".to_string(), 4096),
                ("other_bytes".to_string(), 8192)
            ]
        );
        // Read back through the files: each graph gets its own tensors' bytes.
        let g = Graph::open_file(&dir.join("b.onnx")).unwrap();
        let raw: Vec<u8> = g.initializers.iter().map(|t| t.raw[0]).collect();
        assert_eq!(raw, [1, 1, 2]);
        assert_eq!(g.external_files.iter().collect::<Vec<_>>(), [WEIGHTS_FILE]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn external_data_stays_in_the_folder_and_in_initializers() {
        let dir = std::env::temp_dir().join(format!("ssrl-onnx-edit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("w.data"), [1u8; 8]).unwrap();
        let open = |bytes: Vec<u8>| {
            std::fs::write(dir.join("m.onnx"), bytes).unwrap();
            Graph::open_file(&dir.join("m.onnx"))
        };
        let g = open(model(Some("w.data"), None)).unwrap();
        assert_eq!(g.initializers[0].raw, [1u8; 8]);
        assert_eq!((g.external_bytes, g.needs_external()), (8, true));
        for outside in ["../w.data", "/etc/passwd"] {
            let e = open(model(Some(outside), None)).err().unwrap().to_string();
            assert!(
                e.contains("w: external data") && e.contains("outside"),
                "{e}"
            );
        }
        let e = open(model(None, Some("w.data"))).err().unwrap().to_string();
        assert!(e.contains("node const_0 (Constant)"), "{e}");
        let g = open(model(None, None)).unwrap();
        assert!(!g.needs_external());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The builder decoders' input types, read without their external weights: fp16 and fp32
    /// embeddings, int64 masks, nothing for a name that is not an input.
    #[test]
    fn input_types_are_read_from_the_graph_alone() {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let half = std::fs::read(models.join("tiny-genai-decoder-fp16/model.onnx")).unwrap();
        let full = std::fs::read(models.join("tiny-genai-decoder/model.onnx")).unwrap();
        assert_eq!(input_elem_type(&half, "inputs_embeds"), Some(10));
        assert_eq!(input_elem_type(&half, "past_key_values.1.value"), Some(10));
        assert_eq!(input_elem_type(&full, "inputs_embeds"), Some(1));
        assert_eq!(input_elem_type(&full, "attention_mask"), Some(7));
        assert_eq!(input_elem_type(&full, "logits"), None);
        assert_eq!(input_elem_type(b"not a model", "inputs_embeds"), None);
    }
}
