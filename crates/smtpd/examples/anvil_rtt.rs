//! Temporary measurement: anvil round trips.
use mortal_smtpd::anvil_client::AnvilLease;
use std::time::Instant;
fn main() {
    let path = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let n = 20_000u32;
        let t = Instant::now();
        for i in 0..n {
            let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0A00_0000 + (i % 1000)));
            let (lease, _) = AnvilLease::connect(&path, ip).await.unwrap();
            drop(lease);
        }
        println!("lease (connect + Connect + close): {:.1} us", t.elapsed().as_secs_f64() * 1e6 / f64::from(n));
        let (mut lease, _) = AnvilLease::connect(&path, "10.9.9.9".parse().unwrap()).await.unwrap();
        let t = Instant::now();
        for _ in 0..n {
            lease.message().await.unwrap();
        }
        println!("Message round trip: {:.1} us", t.elapsed().as_secs_f64() * 1e6 / f64::from(n));
    });
}
