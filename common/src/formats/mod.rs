//! Files on disk: `model.safetensors` (a trained model PyTorch and numpy can read),
//! `checkpoint.safetensors` (everything a stopped run needs to continue exactly), the
//! deterministic safetensors writer and checking reader under both, the parameters'
//! [`fingerprint`] (SHA-256 of the little-endian f32 values), and [`write_atomic`], through which
//! every output file is written (a reader never sees a half-written file).

mod atomic_file;
mod checkpoint;
mod fingerprint;
mod model_file;
mod tensor_file;

pub use atomic_file::write_atomic;
pub use checkpoint::Checkpoint;
pub use fingerprint::fingerprint;
pub use model_file::{
    FINGERPRINT_KEY, FORMAT_VERSION, LoadedModel, MODEL_CONFIG_KEY, load_model,
    load_model_from_bytes, save_model,
};
