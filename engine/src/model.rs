//! The Model trait and the parameter store: every parameter is a named candle `Var`, created
//! from the project's seeded generator (candle's CPU generator cannot be seeded).

use crate::error::{Error, Result};
use crate::plugin::{BindContext, PluginConfig};
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng as _;
use rand_distr::{Distribution, StandardNormal};
use std::path::Path;

/// A trainable model.
pub trait Model {
    /// Logits [N, num_classes] for inputs [N, C, H, W].
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    /// Every parameter and buffer, sorted by name.
    fn params(&self) -> &ParamStore;
    /// Whether the model accepts any input height and width (global pooling before the head).
    fn any_input_size(&self) -> bool {
        true
    }
}

/// How a recipe block builds the runtime object.
pub trait ModelConfig: PluginConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Model>>;
}

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

#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub kind: ParamKind,
}

/// A model's named parameters in a stable (sorted) order.
#[derive(Debug, Clone, Default)]
pub struct ParamStore {
    params: Vec<Param>,
}

impl ParamStore {
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
pub struct ParamBuilder {
    rng: Rng,
    device: Device,
    params: Vec<Param>,
}

impl ParamBuilder {
    pub fn new(seed: u64, device: &Device) -> Self {
        ParamBuilder {
            rng: crate::rng::stream(seed, "init"),
            device: device.clone(),
            params: Vec::new(),
        }
    }

    fn add(
        &mut self,
        name: String,
        values: Vec<f32>,
        shape: &[usize],
        kind: ParamKind,
    ) -> Result<Tensor> {
        if self.params.iter().any(|p| p.name == name) {
            return Err(Error::msg(format!(
                "model defines parameter `{name}` twice"
            )));
        }
        let var = Var::from_vec(values, shape, &self.device)?;
        let t = var.as_tensor().clone();
        self.params.push(Param { name, var, kind });
        Ok(t)
    }

    pub fn normal(
        &mut self,
        name: String,
        shape: &[usize],
        std: f64,
        kind: ParamKind,
    ) -> Result<Tensor> {
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
    ) -> Result<Tensor> {
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
    ) -> Result<Tensor> {
        let n = shape.iter().product();
        self.add(name, vec![value; n], shape, kind)
    }

    /// A constant-initialised buffer (running statistics), returned as the Var that holds it.
    pub fn buffer(&mut self, name: String, shape: &[usize], value: f32) -> Result<Var> {
        self.constant(name, shape, value, ParamKind::Buffer)?;
        Ok(self.params[self.params.len() - 1].var.clone())
    }

    pub fn finish(mut self) -> ParamStore {
        self.params.sort_by(|a, b| a.name.cmp(&b.name));
        ParamStore {
            params: self.params,
        }
    }
}
