//! Transactions: offloaded tensors are read from host memory, the rest by the inner backend.

use super::OffloadQTensor;
use super::generated::delegate_transaction_ops;
use super::prelude::*;

/// The inner backend's results (at positions `order`) and the host reads, in request order.
fn merge(
    order: Vec<usize>,
    read: Vec<TensorData>,
    host: Vec<(usize, TensorData)>,
) -> Vec<TensorData> {
    let mut all: Vec<_> = order.into_iter().zip(read).collect();
    all.extend(host);
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, d)| d).collect()
}

impl<B: OffloadTarget> TransactionOps<Self> for OffloadBackend<B> {
    delegate_transaction_ops!();

    async fn tr_execute(
        transaction: TransactionPrimitive<Self>,
    ) -> Result<TransactionPrimitiveData, ExecutionError> {
        // Offloaded floats need no device work: read them directly, the resident ones (and
        // every other kind) in one transaction of the inner backend.
        // A quantized tensor read as float is dequantized on the device (a resident read).
        let mut host = Vec::new();
        let mut resident = Vec::new();
        for (i, t) in transaction.read_floats.into_iter().enumerate() {
            match t {
                OffloadTensor::Offloaded(o) if !o.host().is_quantized() => {
                    host.push((i, o.host().to_data()))
                }
                t => resident.push((i, Self::fetch(t))),
            }
        }
        let mut qhost = Vec::new();
        let mut qresident = Vec::new();
        for (i, t) in transaction.read_qfloats.into_iter().enumerate() {
            match t {
                OffloadQTensor::Offloaded(o) => qhost.push((i, o.host().to_data())),
                OffloadQTensor::Resident(t) => qresident.push((i, t)),
            }
        }
        let (order, floats): (Vec<usize>, Vec<_>) = resident.into_iter().unzip();
        let (qorder, qfloats): (Vec<usize>, Vec<_>) = qresident.into_iter().unzip();
        let mut data = B::tr_execute(TransactionPrimitive::new(
            floats,
            qfloats,
            transaction.read_ints,
            transaction.read_bools,
        ))
        .await?;
        data.read_floats = merge(order, data.read_floats, host);
        data.read_qfloats = merge(qorder, data.read_qfloats, qhost);
        Ok(data)
    }
}
