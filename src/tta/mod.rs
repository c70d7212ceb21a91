//! Test-time adaptation (TTA), the parts every training method of FusionBench's CLIP recipes
//! shares (AdaMerging now; WE-MoE and Concrete next): its objective ([`entropy`]), its optimiser
//! ([`adam`], bit for bit torch's), and its data ([`loaders`]: each task's shuffled, endless
//! test loader, replaying FusionBench's batches from libtorch's generator, [`torch_rng`]; under
//! DDP, with `fabric.devices > 1`, each rank's `DistributedSampler` shard, [`sharded`]), and
//! what a stop signal does to it ([`stop`]: checkpoint the last finished step at once, exit 143).

pub mod adam;
pub mod entropy;
pub mod loaders;
pub mod sharded;
pub mod stop;
pub mod torch_rng;
