//! Transactions: offloaded tensors are read from host memory, the rest by the inner backend.

use super::generated::delegate_transaction_ops;
use super::prelude::*;

impl<B: OffloadTarget> TransactionOps<Self> for OffloadBackend<B> {
    delegate_transaction_ops!();

    async fn tr_execute(
        transaction: TransactionPrimitive<Self>,
    ) -> Result<TransactionPrimitiveData, ExecutionError> {
        // Offloaded floats need no device work: read them directly, the resident ones (and
        // every other kind) in one transaction of the inner backend.
        let mut host = Vec::new();
        let mut resident = Vec::new();
        for (i, t) in transaction.read_floats.into_iter().enumerate() {
            match t {
                OffloadTensor::Offloaded(o) => host.push((i, o.host().to_data())),
                OffloadTensor::Resident(t) => resident.push((i, t)),
            }
        }
        let (order, floats): (Vec<usize>, Vec<_>) = resident.into_iter().unzip();
        let mut data = B::tr_execute(TransactionPrimitive::new(
            floats,
            transaction.read_qfloats,
            transaction.read_ints,
            transaction.read_bools,
        ))
        .await?;
        let mut read_floats: Vec<_> = order.into_iter().zip(data.read_floats).collect();
        read_floats.extend(host);
        read_floats.sort_by_key(|(i, _)| *i);
        data.read_floats = read_floats.into_iter().map(|(_, d)| d).collect();
        Ok(data)
    }
}
