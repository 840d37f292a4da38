//! Models: the Model trait, models as trees of named modules, and module surgery (the way an
//! algorithm rewrites a model before training, Composer's `module_surgery.replace_module_classes`).
//!
//! A module has a kind (its class: `Conv2d`, `BatchNorm2d`, `Bottleneck`, ...), named children
//! (torchvision's attribute names, so a module's path is its PyTorch name: `layer2.0.conv1`) and
//! its own parameters, whose names are their full paths. A [`Network`] is a model built of them.
//! At bind time, before the optimizer exists, each algorithm in recipe order may replace modules
//! selected by kind and path ([`Network::replace`]); a replacement that keeps a module's
//! parameters keeps their names, so exported weights still load where PyTorch has that layer.
//! The rewrite is a pure function of the recipe; the checkpoint records the resulting tree
//! ([`Network::architecture`]) and refuses to load into a model built differently.
//!
//! Fused kernels are chosen at forward time by looking at the children: a residual block whose
//! convolution and batch norm are still the plain layers runs the fused CPU path for that pair,
//! a rewritten pair runs through the generic module calls.

use crate::error::{Error, Result};
use crate::plugin::{BindContext, PluginConfig};
use candle_core::Tensor;
use std::any::Any;

pub use crate::param::{Param, ParamBuilder, ParamKind, ParamStore};

/// A trainable model. The models of the zoo are [`Network`]s (trees of named modules that
/// algorithms may rewrite); a model of another shape implements the trait directly and cannot be
/// rewritten.
pub trait Model {
    /// Logits [N, num_classes] for inputs [N, C, H, W].
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    /// Every parameter and buffer, sorted by name.
    fn params(&self) -> &ParamStore;
    /// Whether the model accepts any input height and width (global pooling before the head).
    fn any_input_size(&self) -> bool {
        true
    }
    /// The module tree, when the model is one.
    fn network(&self) -> Option<&Network> {
        None
    }
    fn network_mut(&mut self) -> Option<&mut Network> {
        None
    }
}

/// How a recipe block builds the runtime object.
pub trait ModelConfig: PluginConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Model>>;
}

/// A layer or a block of layers, with named children.
pub trait Module: Any {
    /// The class name (torchvision's where PyTorch has the layer): what surgery selects by.
    fn kind(&self) -> &'static str;
    /// The forward pass, in training mode when `train`.
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    /// The kind with its hyperparameters, as PyTorch prints it: `Conv2d(16, 32, k=3, s=2, p=1)`.
    fn describe(&self) -> String {
        self.kind().to_string()
    }
    /// This module's own parameters and buffers (not its children's).
    fn own_params(&self) -> Vec<Param> {
        Vec::new()
    }
    /// The child modules by attribute name, in registration (forward) order.
    fn children(&self) -> Vec<(String, &dyn Module)> {
        Vec::new()
    }
    /// The same children, as the slots surgery replaces them in.
    fn children_mut(&mut self) -> Vec<(String, &mut Box<dyn Module>)> {
        Vec::new()
    }
}

/// `m` as its concrete type, when it is one.
pub fn downcast<T: Module>(m: &dyn Module) -> Option<&T> {
    let any: &dyn Any = m;
    any.downcast_ref::<T>()
}

/// Takes `m` as its concrete type, or gives it back.
pub fn downcast_box<T: Module>(m: Box<dyn Module>) -> std::result::Result<Box<T>, Box<dyn Module>> {
    if downcast::<T>(m.as_ref()).is_none() {
        return Err(m);
    }
    let any: Box<dyn Any> = m;
    // Cannot fail: the type was checked above.
    any.downcast::<T>()
        .map_err(|_| Box::new(Identity) as Box<dyn Module>)
}

fn join(path: &str, child: &str) -> String {
    if path.is_empty() {
        child.to_string()
    } else {
        format!("{path}.{child}")
    }
}

/// Every module under `m` (itself first), with its path, in registration order.
pub fn walk<'a>(path: &str, m: &'a dyn Module, out: &mut Vec<(String, &'a dyn Module)>) {
    out.push((path.to_string(), m));
    for (name, c) in m.children() {
        walk(&join(path, &name), c, out);
    }
}

fn collect_params(m: &dyn Module, out: &mut Vec<Param>) {
    out.extend(m.own_params());
    for (_, c) in m.children() {
        collect_params(c, out);
    }
}

/// What surgery builds from the module it replaces (given its path).
type Make<'a> = dyn FnMut(&str, Box<dyn Module>) -> Result<Box<dyn Module>> + 'a;

/// Replaces, depth first, every module under `slot` that `select` picks (the replacement is not
/// searched again); returns the paths replaced.
fn replace_in(
    path: &str,
    slot: &mut Box<dyn Module>,
    select: &mut dyn FnMut(&str, &dyn Module) -> bool,
    make: &mut Make,
    done: &mut Vec<String>,
) -> Result<()> {
    if select(path, slot.as_ref()) {
        let old = std::mem::replace(slot, Box::new(Identity));
        *slot = make(path, old)?;
        done.push(path.to_string());
        return Ok(());
    }
    for (name, child) in slot.children_mut() {
        replace_in(&join(path, &name), child, select, make, done)?;
    }
    Ok(())
}

/// A model built of modules: the root, and the parameters collected from the tree.
pub struct Network {
    root: Box<dyn Module>,
    params: ParamStore,
    any_input_size: bool,
    /// What each surgery did, in order: `blurpool: Conv2d -> BlurConv2d at layer2.0.conv1, ...`.
    rewrites: Vec<String>,
}

impl Network {
    /// The network of `root`; `any_input_size` when it pools globally before its head.
    pub fn new(root: Box<dyn Module>, any_input_size: bool) -> Result<Network> {
        let params = Self::collect(root.as_ref())?;
        Ok(Network {
            root,
            params,
            any_input_size,
            rewrites: Vec::new(),
        })
    }

    fn collect(root: &dyn Module) -> Result<ParamStore> {
        let mut v = Vec::new();
        collect_params(root, &mut v);
        ParamStore::new(v)
    }

    pub fn root(&self) -> &dyn Module {
        self.root.as_ref()
    }

    /// Every module with its path (the root's is empty), in registration order.
    pub fn modules(&self) -> Vec<(String, &dyn Module)> {
        let mut v = Vec::new();
        walk("", self.root.as_ref(), &mut v);
        v
    }

    /// The tree as lines `path: Kind(hyperparameters)`: what a checkpoint records.
    pub fn architecture(&self) -> Vec<String> {
        self.modules()
            .into_iter()
            .map(|(p, m)| {
                let p = if p.is_empty() { "(root)" } else { p.as_str() };
                format!("{p}: {}", m.describe())
            })
            .collect()
    }

    /// The rewrites applied so far, one line per surgery.
    pub fn rewrites(&self) -> &[String] {
        &self.rewrites
    }

    /// Module surgery: replaces every module that `select` picks (by path and module; the root
    /// is never replaced) with what `make` builds from it, then collects the parameters again.
    /// `by` names the algorithm in the record. Returns the paths replaced, in tree order.
    pub fn replace(
        &mut self,
        by: &str,
        mut select: impl FnMut(&str, &dyn Module) -> bool,
        mut make: impl FnMut(&str, Box<dyn Module>) -> Result<Box<dyn Module>>,
    ) -> Result<Vec<String>> {
        let mut done = Vec::new();
        let mut kinds = std::collections::BTreeMap::<String, usize>::new();
        for (name, child) in self.root.children_mut() {
            replace_in(&name, child, &mut select, &mut make, &mut done)?;
        }
        for (p, m) in self.modules() {
            if done.contains(&p) {
                *kinds.entry(m.kind().to_string()).or_default() += 1;
            }
        }
        self.params = Self::collect(self.root.as_ref())?;
        let what = kinds
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ");
        self.rewrites.push(if done.is_empty() {
            // Said at once: an algorithm that rewrites nothing trains the plain model, which a
            // user comparing runs would otherwise find out from identical results.
            tracing::warn!(
                "{by}: no module of this model matches, so it changes nothing (check its settings against the model: `recipe show` lists each surgery)"
            );
            format!("{by}: nothing to replace")
        } else {
            format!("{by}: {what} at {}", done.join(", "))
        });
        Ok(done)
    }
}

impl Model for Network {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.root.forward(x, train)
    }
    fn params(&self) -> &ParamStore {
        &self.params
    }
    fn any_input_size(&self) -> bool {
        self.any_input_size
    }
    fn network(&self) -> Option<&Network> {
        Some(self)
    }
    fn network_mut(&mut self) -> Option<&mut Network> {
        Some(self)
    }
}

/// What an algorithm gets at the surgery point: the model's tree (when it has one) and a
/// parameter builder of its own seeded stream for the modules it adds.
pub struct Surgery<'a> {
    pub(crate) model: &'a mut dyn Model,
    pub params: ParamBuilder,
    pub(crate) by: String,
}

impl Surgery<'_> {
    /// The model's module tree, or an error saying that this model cannot be rewritten.
    pub fn network(&mut self) -> Result<&mut Network> {
        Ok(self.parts()?.0)
    }

    /// The tree and the builder of new parameters, both at once (for replacements that add
    /// parameters).
    pub fn parts(&mut self) -> Result<(&mut Network, &mut ParamBuilder)> {
        let by = self.by.clone();
        let net = self.model.network_mut().ok_or_else(|| {
            Error::msg(format!(
                "{by} rewrites the model's modules, but this model is not a module tree; use a model of the zoo (`recipe list` shows them) or leave {by} out"
            ))
        })?;
        Ok((net, &mut self.params))
    }

    /// The algorithm's label, for [`Network::replace`].
    pub fn by(&self) -> &str {
        &self.by
    }
}

/// Passes its input through (a placeholder while surgery swaps a slot, and a layer of its own).
pub struct Identity;

impl Module for Identity {
    fn kind(&self) -> &'static str {
        "Identity"
    }
    fn forward(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(x.clone())
    }
}

/// Children applied in order, named "0", "1", ... as in PyTorch.
pub struct Sequential {
    pub layers: Vec<Box<dyn Module>>,
}

impl Module for Sequential {
    fn kind(&self) -> &'static str {
        "Sequential"
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = l.forward(&h, train)?;
        }
        Ok(h)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        self.layers
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l.as_ref()))
            .collect()
    }
    fn children_mut(&mut self) -> Vec<(String, &mut Box<dyn Module>)> {
        self.layers
            .iter_mut()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l))
            .collect()
    }
}
