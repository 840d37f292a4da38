//! Parameters: every parameter and buffer is a named candle `Var`, created from the project's
//! seeded generator (candle's CPU generator cannot be seeded), kept in a name-sorted store.

use crate::error::{Error, Result};
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng as _;
use rand_distr::{Distribution, StandardNormal};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What a named tensor is, which decides its optimizer treatment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Convolution and linear weights: trained, weight decay applies.
    Weight,
    /// Biases: trained, no weight decay unless asked.
    Bias,
    /// Normalisation scales and shifts: trained, no weight decay unless asked.
    Norm,
    /// Running statistics: saved with the model, never trained.
    Buffer,
}

/// A named parameter or buffer. Clones share the value and the frozen flag.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub kind: ParamKind,
    /// Set by layer freezing: the forward pass then reads the value as a constant, so no
    /// gradient flows to it (and none through the layers before it).
    frozen: Arc<AtomicBool>,
}

impl Param {
    pub fn new(name: String, var: Var, kind: ParamKind) -> Param {
        Param {
            name,
            var,
            kind,
            frozen: Arc::default(),
        }
    }

    /// The value for a forward pass: the variable itself, or a detached copy of it when frozen.
    pub fn tensor(&self) -> Tensor {
        if self.is_frozen() {
            self.var.as_tensor().detach()
        } else {
            self.var.as_tensor().clone()
        }
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Relaxed)
    }

    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Relaxed);
    }
}

/// A model's named parameters in a stable (sorted) order.
#[derive(Debug, Clone, Default)]
pub struct ParamStore {
    params: Vec<Param>,
}

impl ParamStore {
    /// The store of `params`, sorted by name; a name given twice is an error.
    pub fn new(mut params: Vec<Param>) -> Result<ParamStore> {
        params.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = params.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(Error::msg(format!(
                "the model defines parameter `{}` twice",
                w[0].name
            )));
        }
        Ok(ParamStore { params })
    }

    /// The parameter named `name`.
    pub fn get(&self, name: &str) -> Option<&Param> {
        self.params
            .binary_search_by(|p| p.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.params[i])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.iter()
    }

    /// The parameters the optimizer updates.
    pub fn trainable(&self) -> impl Iterator<Item = &Param> {
        self.params.iter().filter(|p| p.kind != ParamKind::Buffer)
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        self.trainable().map(|p| p.var.elem_count()).sum()
    }

    /// Writes every parameter and buffer to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = safetensors::serialize(
            self.params
                .iter()
                .map(|p| (p.name.as_str(), p.var.as_tensor())),
            None,
        )
        .map_err(|e| Error::msg(format!("cannot serialize the weights: {e}")))?;
        // Atomic, and with the permissions of every other file the run writes.
        crate::atomic::write_atomic(path, &bytes)
    }

    /// Loads values for every parameter from a safetensors file (names and shapes must match).
    pub fn load(&self, path: &Path) -> Result<()> {
        let dev = self
            .params
            .first()
            .map(|p| p.var.device().clone())
            .unwrap_or(Device::Cpu);
        let map = candle_core::safetensors::load(path, &dev)
            .map_err(|e| Error::msg(format!("cannot read weights from {}: {e}", path.display())))?;
        for p in &self.params {
            let t = map.get(&p.name).ok_or_else(|| {
                Error::msg(format!(
                    "{} has no tensor named `{}`",
                    path.display(),
                    p.name
                ))
            })?;
            if t.dims() != p.var.dims() {
                return Err(Error::msg(format!(
                    "{}: `{}` has shape {:?}, the model expects {:?}",
                    path.display(),
                    p.name,
                    t.dims(),
                    p.var.dims()
                )));
            }
            p.var.set(&t.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    /// All values, flattened in name order (for determinism checks).
    pub fn flat_values(&self) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for p in &self.params {
            out.extend(
                p.var
                    .as_tensor()
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(out)
    }
}

/// Creates a model's parameters from the seeded generator, with the initialisations torchvision
/// uses (Kaiming normal, fan-out, for convolutions; PyTorch's uniform default for linear layers).
/// Each call draws the next values of one stream: a model's parameters come out the same for the
/// same seed and the same order of calls.
pub struct ParamBuilder {
    rng: Rng,
    device: Device,
}

impl ParamBuilder {
    /// The builder of a model's own parameters.
    pub fn new(seed: u64, device: &Device) -> Self {
        Self::stream(seed, "init", device)
    }

    /// A builder drawing from the stream named `purpose` (module surgery gives each algorithm
    /// its own, so that a rewrite leaves the model's other parameters as they were).
    pub fn stream(seed: u64, purpose: &str, device: &Device) -> Self {
        ParamBuilder {
            rng: crate::rng::stream(seed, purpose),
            device: device.clone(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn add(
        &mut self,
        name: String,
        values: Vec<f32>,
        shape: &[usize],
        kind: ParamKind,
    ) -> Result<Param> {
        let var = Var::from_vec(values, shape, &self.device)?;
        Ok(Param::new(name, var, kind))
    }

    pub fn normal(
        &mut self,
        name: String,
        shape: &[usize],
        std: f64,
        kind: ParamKind,
    ) -> Result<Param> {
        let n = shape.iter().product();
        let v = (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut self.rng);
                (z * std) as f32
            })
            .collect();
        self.add(name, v, shape, kind)
    }

    pub fn uniform(
        &mut self,
        name: String,
        shape: &[usize],
        bound: f64,
        kind: ParamKind,
    ) -> Result<Param> {
        let n = shape.iter().product();
        let v = (0..n)
            .map(|_| self.rng.random_range(-bound..bound) as f32)
            .collect();
        self.add(name, v, shape, kind)
    }

    pub fn constant(
        &mut self,
        name: String,
        shape: &[usize],
        value: f32,
        kind: ParamKind,
    ) -> Result<Param> {
        let n = shape.iter().product();
        self.add(name, vec![value; n], shape, kind)
    }
}
