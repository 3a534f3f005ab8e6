//! weft-proto: the protocols every weft part shares — generated protobuf and
//! gRPC code, SPIFFE identity, TLS, the certificate manager and HBONE.

pub mod certs;
pub mod credential;
pub mod grpc;
pub mod hbone;
pub mod identity;
pub mod listen;
pub mod model;
pub mod process;
pub mod request_policy;
pub mod resources;
pub mod roots;
pub mod routes;
pub mod shards;
pub mod telemetry;
pub mod tls;
pub mod xds;

pub use identity::Identity;

/// Generated protobuf and gRPC code. Modules mirror the protobuf packages
/// because generated code refers across packages by relative path.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]

    pub mod istio {
        pub mod v1 {
            pub mod auth {
                tonic::include_proto!("istio.v1.auth");
            }
        }
    }
    pub mod google {
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
    }
    pub mod envoy {
        pub mod service {
            pub mod discovery {
                pub mod v3 {
                    tonic::include_proto!("envoy.service.discovery.v3");
                }
            }
        }
    }
    pub mod weft {
        pub mod v1 {
            tonic::include_proto!("weft.v1");
        }
    }

    pub use envoy::service::discovery::v3 as xds;
    pub use istio::v1::auth as ca;
}
