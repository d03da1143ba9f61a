//! The krate API model: which kinds exist and how each behaves, independent of HTTP and
//! storage. The API server drives these pieces through one generic REST path.

pub mod cel;
pub mod convert;
pub mod custom;
pub mod error;
#[cfg(test)]
mod fuzz;
#[doc(hidden)]
pub mod fuzzing;
pub mod kinds;
pub mod managed;
pub mod object;
pub mod patch;
pub mod printers;
pub mod protobuf;
pub mod quantity;
pub mod quota;
pub mod schema;
pub mod selectors;
pub mod strategy;
pub mod validation;

pub use error::{ApiError, ApiResult, FieldError};
pub use kinds::{KindInfo, Registry, StorageResource};
