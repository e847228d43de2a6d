//! Helpers of the fuzz targets in fuzz_targets/.

pub mod chains;
