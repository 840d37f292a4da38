//! The model zoo: an MLP, a small CNN, CIFAR-style ResNets and ImageNet-layout ResNets.
//! Parameter names follow torchvision's where the architecture exists there.

pub mod layers;
mod mlp;
mod resnet;
mod small_cnn;

pub use mlp::MlpConfig;
pub use resnet::{Block, Branch, ResNetCifarConfig, ResNetConfig};
pub use small_cnn::SmallCnnConfig;
