//! The persistence trait.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A component whose complete state can be saved and built back.
///
/// `save` is called only while the VM is paused (nothing changes under it); `restore`
/// builds a fresh component from a saved state plus whatever the new machine provides
/// (`Args`: guest memory, interrupt lines, file descriptors). States are plain data:
/// serde-serialisable, versioned by the snapshot format that holds them, and never
/// trusted: `restore` checks every field a malformed file could make wrong and returns
/// an error rather than building a component that would misbehave.
pub trait Persist: Sized {
    /// Everything needed to build the component back.
    type State: Serialize + DeserializeOwned;
    /// What the new machine hands to `restore`.
    type Args;
    /// Why saving or restoring failed.
    type Error: std::error::Error;

    fn save(&self) -> Result<Self::State, Self::Error>;
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}
