// IPPool objects for tests: the one way tests create pools against the real API server.

use anyhow::Context;
use kube::Client;
use kube::api::{Api, PostParams};
use tortie::api::{IPPool, IPPoolSpec};

/// Creates IPPool `name` with exactly `spec`.
pub async fn create_pool_spec(client: &Client, name: &str, spec: IPPoolSpec) -> anyhow::Result<()> {
    Api::<IPPool>::all(client.clone())
        .create(&PostParams::default(), &IPPool::new(name, spec))
        .await
        .with_context(|| format!("create pool {name}"))?;
    Ok(())
}

/// Creates IPPool `name` over `cidr` with `block_size`, every other field at its default.
pub async fn create_pool(
    client: &Client,
    name: &str,
    cidr: &str,
    block_size: i32,
) -> anyhow::Result<()> {
    let spec = IPPoolSpec {
        cidr: cidr.into(),
        block_size: Some(block_size),
        ..Default::default()
    };
    create_pool_spec(client, name, spec).await
}
