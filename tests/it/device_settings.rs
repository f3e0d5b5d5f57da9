//! Burn's per-device settings hold for both placements of a device. Settings can only be made
//! before the device's first tensor, so the test runs in a process of its own.

use crate::common;

use burn::backend::NdArray;
use burn::prelude::*;
use burn::tensor::DType;
use burn_offload::{OffloadBackend, OffloadDevice};

type B = OffloadBackend<NdArray>;
const CPU: burn::backend::ndarray::NdArrayDevice = burn::backend::ndarray::NdArrayDevice::Cpu;

#[test]
fn per_device_settings_hold_for_both_placements() {
    common::own_process!("Burn takes a device's settings only before its first tensor");
    // Both placements are one device to Burn: settings made for one apply to the other.
    let host = OffloadDevice::Host(CPU);
    let resident = OffloadDevice::Device(CPU);
    assert_eq!(
        burn::tensor::backend::Device::to_id(&host),
        burn::tensor::backend::Device::to_id(&resident)
    );
    burn::tensor::set_default_dtypes::<B>(&host, DType::F32, DType::I32)
        .expect("settings can be set before any tensor is created on the device");
    let mask = Tensor::<B, 1>::from_data([1.0, -1.0, 2.0], &host).greater_elem(0.0);
    assert_eq!(mask.int().dtype(), DType::I32);
    // Created on `Host(d)`, a tensor's results live on `Device(d)`: the same settings.
    let offloaded = Tensor::<B, 1>::from_data([1.0, -1.0], &host);
    assert!(common::on_host(&offloaded));
    let result = (offloaded * 2.0).greater_elem(0.0).int();
    assert_eq!(result.dtype(), DType::I32);
    assert_eq!(result.into_data().to_vec::<i32>().unwrap(), [1, 0]);
    let _ = NdArray::<f32>::name(&CPU);
}
