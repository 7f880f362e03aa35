//! The `PostgreSQL` store over TLS, against a throwaway cluster that admits TCP over TLS
//! only (`hostssl`): a connection that succeeds there is encrypted. The server's
//! certificate is issued by a fresh CA for `localhost` and `127.0.0.1`.

mod support;

use gatekeep_server::{
    certs::Pki,
    store::{PostgresStore, StoreConfig},
};
use support::pg;

fn store_config(url: String, ca_file: Option<std::path::PathBuf>) -> StoreConfig {
    StoreConfig {
        url: Some(url),
        ca_file,
        ..StoreConfig::default()
    }
}

#[tokio::test]
async fn the_store_speaks_verified_tls_and_never_falls_back_to_plaintext() {
    let pki = Pki::ephemeral(&[]).expect("pki");
    let cluster = pg::start_tls(pg::ServerTls {
        cert_pem: &pki.server.cert_pem,
        key_pem: &pki.server.key_pem,
    })
    .expect("a TLS-only cluster");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("db-ca.pem");
    std::fs::write(&ca_file, pki.ca.cert_pem()).expect("write the CA");
    let url = |host: &str, mode: &str| {
        format!(
            "postgres://{}@{host}:{}/postgres?sslmode={mode}",
            pg::USER,
            cluster.port
        )
    };

    // Verified TLS, by name and by address: the store connects (and migrates) over TLS.
    for host in ["localhost", "127.0.0.1"] {
        let store =
            PostgresStore::connect(&store_config(url(host, "require"), Some(ca_file.clone())))
                .await
                .unwrap_or_else(|err| panic!("TLS to {host}: {}", error_chain(&err)));
        drop(store);
    }
    // `prefer` on this host takes TLS when the server offers it.
    PostgresStore::connect(&store_config(
        url("127.0.0.1", "prefer"),
        Some(ca_file.clone()),
    ))
    .await
    .unwrap_or_else(|err| panic!("prefer: {}", error_chain(&err)));

    // A certificate from a CA the store does not trust: refused, not accepted.
    let err = PostgresStore::connect(&store_config(url("localhost", "require"), None))
        .await
        .expect_err("an untrusted certificate is refused");
    let chain = error_chain(&err);
    assert!(
        chain.contains("UnknownIssuer"),
        "the error names the untrusted certificate: {chain}"
    );

    // Plaintext, asked for explicitly, is refused by a server that demands TLS: the store
    // never sent the session in clear and says why it failed.
    let err = PostgresStore::connect(&store_config(url("127.0.0.1", "disable"), Some(ca_file)))
        .await
        .expect_err("plaintext is refused");
    let chain = error_chain(&err);
    assert!(
        chain.contains("no pg_hba.conf entry") && chain.contains("no encryption"),
        "the server's refusal of a session without TLS: {chain}"
    );
}

/// An error and its sources, one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
