//! The built-in development secret is public: `shop-local` refuses to serve
//! with it on an address other hosts can reach, gRPC or HTTP.

use std::process::Command;

fn refused_with(vars: &[(&str, &str)]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_shop-local"))
        .env_remove("AUTH_HS256_SECRET")
        .env_remove("AUTH_JWKS_FILE")
        .env_remove("AUTH_DISABLED")
        // Were the address let through, start-up would end here instead,
        // without the message.
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/postgres")
        .envs(vars.iter().copied())
        .output()
        .expect("shop-local runs");
    assert!(!output.status.success(), "shop-local started with {vars:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn the_public_secret_is_refused_on_reachable_addresses() {
    let grpc = refused_with(&[("SHOP_FIRST_ADDR", "0.0.0.0:0")]);
    assert!(
        grpc.contains("AUTH_HS256_SECRET") && grpc.contains("0.0.0.0"),
        "{grpc}"
    );
    let http = refused_with(&[("GATEWAY_ADDR", "0.0.0.0:0")]);
    assert!(
        http.contains("AUTH_HS256_SECRET") && http.contains("0.0.0.0"),
        "{http}"
    );
}
