//! Model files in the safetensors format: the weights under their PyTorch names (so
//! `safetensors.torch.load_file` feeds them straight into nn.Linear layers), optionally Adam's
//! moments as `adam.m.<name>` / `adam.v.<name>`, and the configuration in the metadata. Writes
//! are atomic; reads check everything and never execute anything from the file.

use crate::config::{Activation, Config, Likelihood, LOGVAR_MAX, LOGVAR_MIN};
use crate::error::{Result, VaeError};
use crate::optim::AdamState;
use crate::params::ParamLayout;
use crate::train::Model;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// Identifies fastvae model files.
pub const FORMAT: &str = "fastvae.vae";
/// Bumped whenever the layout of the file changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

/// Everything a model file holds.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub config: Config,
    pub seed: u64,
    pub params: Vec<f32>,
    /// Present when the file was saved with its optimizer state.
    pub adam: Option<AdamState>,
    pub epoch: u64,
    /// Metadata entries fastvae does not interpret (the Python layer's history, say).
    pub extra: HashMap<String, String>,
}

fn bad(msg: impl Into<String>) -> VaeError {
    VaeError::Checkpoint(msg.into())
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

const RESERVED: [&str; 13] = [
    "format",
    "format_version",
    "fastvae_version",
    "input_dim",
    "hidden_dims",
    "latent_dim",
    "activation",
    "likelihood",
    "seed",
    "epoch",
    "step",
    "has_optimizer",
    "crc32",
];

/// Serialize a model (and optionally its Adam state) with extra metadata entries.
pub fn to_bytes(
    model: &Model,
    include_optimizer: bool,
    extra: &HashMap<String, String>,
) -> Result<Vec<u8>> {
    let vae = &model.vae;
    let cfg = &vae.config;
    let specs = vae.layout.tensors();
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in &specs {
        named.push((
            t.name.clone(),
            t.shape.clone(),
            le_bytes(&t.export(&vae.params)),
        ));
        if include_optimizer {
            let m = le_bytes(&t.export(&model.adam.m));
            let v = le_bytes(&t.export(&model.adam.v));
            named.push((format!("adam.m.{}", t.name), t.shape.clone(), m));
            named.push((format!("adam.v.{}", t.name), t.shape.clone(), v));
        }
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta: HashMap<String, String> = HashMap::new();
    for (k, v) in extra {
        if RESERVED.contains(&k.as_str()) {
            return Err(VaeError::Config(format!("metadata key {k:?} is reserved")));
        }
        meta.insert(k.clone(), v.clone());
    }
    let hidden: Vec<String> = cfg.hidden_dims.iter().map(|h| h.to_string()).collect();
    let entries = [
        ("format", FORMAT.to_string()),
        ("format_version", FORMAT_VERSION.to_string()),
        ("fastvae_version", env!("CARGO_PKG_VERSION").to_string()),
        ("input_dim", cfg.input_dim.to_string()),
        ("hidden_dims", hidden.join(",")),
        ("latent_dim", cfg.latent_dim.to_string()),
        ("activation", cfg.activation.name().to_string()),
        ("likelihood", cfg.likelihood.name().to_string()),
        ("seed", model.seed.to_string()),
        ("epoch", model.epoch.to_string()),
        ("step", model.adam.t.to_string()),
        ("has_optimizer", include_optimizer.to_string()),
    ];
    for (k, v) in entries {
        meta.insert(k.to_string(), v);
    }
    let crc = checksum(
        &meta,
        named.iter().map(|(n, _, d)| (n.as_str(), d.as_slice())),
    );
    meta.insert("crc32".into(), crc);
    let views = named
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| bad(format!("cannot serialize {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| bad(format!("cannot serialize: {e}")))?;
    sorted_header(bytes)
}

/// The file with its JSON header's keys in sorted order, so that the same model always gives
/// the same bytes (safetensors writes the metadata in a hash map's order, which varies from
/// call to call). The tensors' offsets count from the end of the header, so only the header
/// (8-byte length, JSON padded with spaces to a multiple of 8) is rewritten.
fn sorted_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    // serde_json's maps are ordered by key.
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len])
        .map_err(|e| bad(format!("cannot serialize: {e}")))?;
    let mut json =
        serde_json::to_vec(&header).map_err(|e| bad(format!("cannot serialize: {e}")))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - len);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + len..]);
    Ok(out)
}

/// CRC-32 over every metadata entry but the checksum itself and every tensor's name and bytes,
/// all in name order, so a flipped bit anywhere that still parses is caught.
fn checksum<'a>(
    meta: &HashMap<String, String>,
    tensors: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> String {
    let mut crc = crc32fast::Hasher::new();
    let mut keys: Vec<&String> = meta.keys().filter(|k| k.as_str() != "crc32").collect();
    keys.sort_unstable();
    for k in keys {
        for part in [k.as_bytes(), &[0], meta[k].as_bytes(), &[0]] {
            crc.update(part);
        }
    }
    for (name, data) in tensors {
        crc.update(name.as_bytes());
        crc.update(&[0]);
        crc.update(data);
    }
    format!("{:08x}", crc.finalize())
}

fn meta_get<'a>(meta: &'a HashMap<String, String>, key: &str) -> Result<&'a str> {
    meta.get(key)
        .map(String::as_str)
        .ok_or_else(|| bad(format!("not a fastvae model file: metadata has no {key:?}")))
}

fn meta_num<T: std::str::FromStr>(meta: &HashMap<String, String>, key: &str) -> Result<T> {
    let s = meta_get(meta, key)?;
    s.parse()
        .map_err(|_| bad(format!("metadata {key:?} is {s:?}, not a valid number")))
}

/// The tensor `name`, checked to be float32 of `shape`.
fn tensor_view<'a>(st: &'a SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<TensorView<'a>> {
    let view = st
        .tensor(name)
        .map_err(|_| bad(format!("the file has no tensor {name:?}")))?;
    if view.dtype() != Dtype::F32 {
        return Err(bad(format!(
            "tensor {name:?} has dtype {:?}, expected F32",
            view.dtype()
        )));
    }
    if view.shape() != shape {
        return Err(bad(format!(
            "tensor {name:?} has shape {:?} but the configuration needs {shape:?}",
            view.shape()
        )));
    }
    Ok(view)
}

fn read_tensor(st: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let view = tensor_view(st, name, shape)?;
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!(
            "tensor {name:?} holds a non-finite value at {i}"
        )));
    }
    Ok(values)
}

/// Parse and check a model file's bytes.
pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let meta = header
        .metadata()
        .clone()
        .ok_or_else(|| bad("not a fastvae model file: it has no metadata"))?;
    let format = meta_get(&meta, "format")?;
    if format != FORMAT {
        return Err(bad(format!(
            "not a fastvae model file: format is {format:?}"
        )));
    }
    let version: u32 = meta_num(&meta, "format_version")?;
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "model file format version {version} is not supported (this fastvae reads version {FORMAT_VERSION}); it was written by fastvae {}",
            meta.get("fastvae_version").map_or("?", String::as_str)
        )));
    }
    let hidden_s = meta_get(&meta, "hidden_dims")?;
    let hidden = if hidden_s.is_empty() {
        Vec::new()
    } else {
        hidden_s
            .split(',')
            .map(|h| h.parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| {
                bad(format!(
                    "metadata hidden_dims is {hidden_s:?}, not a list of sizes"
                ))
            })?
    };
    let activation = Activation::parse(meta_get(&meta, "activation")?)
        .map_err(|e| bad(format!("metadata: {e}")))?;
    // Files written before the Gaussian likelihood have no entry: they are Bernoulli models.
    let likelihood = match meta.get("likelihood") {
        None => Likelihood::Bernoulli,
        Some(name) => Likelihood::parse(name).map_err(|e| bad(format!("metadata: {e}")))?,
    };
    let config = Config::with_likelihood(
        meta_num(&meta, "input_dim")?,
        hidden,
        meta_num(&meta, "latent_dim")?,
        activation,
        likelihood,
    )
    .map_err(|e| bad(format!("metadata describes an invalid model: {e}")))?;
    let has_optimizer = match meta_get(&meta, "has_optimizer")? {
        "true" => true,
        "false" => false,
        other => return Err(bad(format!("metadata has_optimizer is {other:?}"))),
    };

    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    let views = names
        .iter()
        .map(|&n| st.tensor(n).map(|v| (n, v)).map_err(|e| bad(e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    let want = meta_get(&meta, "crc32")?;
    let got = checksum(&meta, views.iter().map(|(n, v)| (*n, v.data())));
    if want != got {
        return Err(bad(format!(
            "the file is corrupt: its tensors' checksum is {got}, the file records {want}"
        )));
    }

    let layout = ParamLayout::new(&config);
    let specs = layout.tensors();
    let expected = specs.len() * if has_optimizer { 3 } else { 1 };
    if names.len() != expected {
        return Err(bad(format!(
            "the file has {} tensors; its configuration needs {expected}",
            names.len()
        )));
    }
    // Every name and shape first: a small file whose metadata describes a huge model is
    // refused before anything of the model's size is allocated.
    for t in &specs {
        tensor_view(&st, &t.name, &t.shape)?;
        if has_optimizer {
            tensor_view(&st, &format!("adam.m.{}", t.name), &t.shape)?;
            tensor_view(&st, &format!("adam.v.{}", t.name), &t.shape)?;
        }
    }
    let mut params = vec![0.0f32; layout.len];
    let mut adam = has_optimizer.then(|| AdamState::new(layout.len));
    for t in &specs {
        t.import(&read_tensor(&st, &t.name, &t.shape)?, &mut params);
        if let Some(a) = adam.as_mut() {
            let m = read_tensor(&st, &format!("adam.m.{}", t.name), &t.shape)?;
            let v = read_tensor(&st, &format!("adam.v.{}", t.name), &t.shape)?;
            if v.iter().any(|&x| x < 0.0) {
                return Err(bad(format!("adam.v.{} holds a negative value", t.name)));
            }
            t.import(&m, &mut a.m);
            t.import(&v, &mut a.v);
        }
    }
    if let Some(a) = adam.as_mut() {
        a.t = meta_num(&meta, "step")?;
    }
    if let Some(lv) = &layout.out_logvar {
        if let Some(v) = params[lv.clone()]
            .iter()
            .find(|v| !(LOGVAR_MIN..=LOGVAR_MAX).contains(*v))
        {
            return Err(bad(format!(
                "decoder_logvar holds {v}, outside [{LOGVAR_MIN}, {LOGVAR_MAX}]"
            )));
        }
    }
    let extra = meta
        .iter()
        .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Checkpoint {
        config,
        seed: meta_num(&meta, "seed")?,
        params,
        adam,
        epoch: meta_num(&meta, "epoch")?,
        extra,
    })
}

/// Write `bytes` to `path` so that a crash at any moment leaves the old file or the new one:
/// a temporary file in the same directory, flushed and fsynced, renamed over the target, and
/// the directory fsynced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:x}",
        name.to_string_lossy(),
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            d.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    } else {
        remove_stale_temporaries(dir, &name.to_string_lossy());
    }
    result
}

/// Remove temporary files that earlier writers of `name` left behind when they were killed
/// mid-write: those whose process no longer runs. Linux only (it asks /proc); elsewhere
/// nothing is removed.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Save a model file atomically.
pub fn save(
    path: &Path,
    model: &Model,
    include_optimizer: bool,
    extra: &HashMap<String, String>,
) -> Result<()> {
    let bytes = to_bytes(model, include_optimizer, extra)?;
    write_atomic(path, &bytes).map_err(|e| bad(format!("cannot write {}: {e}", path.display())))
}

/// Read and check a model file.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes =
        std::fs::read(path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
    from_bytes(&bytes).map_err(|e| match e {
        VaeError::Checkpoint(m) => bad(format!("{}: {m}", path.display())),
        other => other,
    })
}

impl Model {
    /// A model with a checkpoint's weights, and its optimizer state when it has one.
    pub fn from_checkpoint(ck: Checkpoint, threads: usize) -> Result<Model> {
        let mut model = Model::new(ck.config, ck.seed, threads)?;
        model.vae.params = ck.params;
        if let Some(adam) = ck.adam {
            model.adam = adam;
        }
        model.epoch = ck.epoch;
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let model =
            Model::new(Config::new(6, vec![4], 2, Activation::Tanh).unwrap(), 3, 1).unwrap();
        let extra = HashMap::from([("history".to_string(), "[]".to_string())]);
        let bytes = to_bytes(&model, true, &extra).unwrap();
        // The same model gives the same bytes, call after call.
        let many = HashMap::from_iter((0..20).map(|i| (format!("k{i}"), i.to_string())));
        let once = to_bytes(&model, true, &many).unwrap();
        assert!((0..5).all(|_| to_bytes(&model, true, &many).unwrap() == once));
        assert_eq!(from_bytes(&once).unwrap().extra, many);
        let ck = from_bytes(&bytes).unwrap();
        assert_eq!(ck.params, model.vae.params);
        assert_eq!(ck.config, model.vae.config);
        assert_eq!(ck.extra, extra);
        // Every truncation and every single-bit flip is rejected (or, for a flip in
        // whitespace-insensitive JSON, still reads back the same model).
        for cut in 0..bytes.len() {
            assert!(from_bytes(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            if let Ok(ck2) = from_bytes(&b) {
                assert_eq!(
                    ck2.params, model.vae.params,
                    "flip at {i} changed the weights"
                );
                assert_eq!(ck2.epoch, model.epoch, "flip at {i}");
                assert_eq!(ck2.seed, model.seed, "flip at {i}");
                assert_eq!(ck2.extra, extra, "flip at {i}");
            }
        }
    }
}
