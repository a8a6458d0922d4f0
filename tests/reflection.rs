//! Server reflection in both versions (grpcurl 1.8 speaks only v1alpha,
//! newer clients v1): the same services and descriptors from each.

mod common;

use common::*;

macro_rules! reflection_test {
    ($name:ident, $version:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;

            let server = TestServer::start(Backend::Memory).await;
            let channel = tonic::transport::Channel::from_shared(server.endpoint())
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = ServerReflectionClient::new(channel);
            let requests = vec![
                ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(MessageRequest::ListServices(String::new())),
                },
                ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(MessageRequest::FileContainingSymbol(
                        "leasehold.v1.LockService".into(),
                    )),
                },
            ];
            let mut replies = client
                .server_reflection_info(tokio_stream::iter(requests))
                .await
                .unwrap()
                .into_inner();
            let first = replies.message().await.unwrap().unwrap();
            let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
                panic!("expected a service list, got {first:?}");
            };
            let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
            assert!(names.contains(&"leasehold.v1.LockService"), "{names:?}");
            assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
            let second = replies.message().await.unwrap().unwrap();
            let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response
            else {
                panic!("expected descriptors, got {second:?}");
            };
            let file = prost::Message::decode(files.file_descriptor_proto[0].as_slice())
                .map(|f: prost_types::FileDescriptorProto| f)
                .unwrap();
            assert_eq!(file.package(), "leasehold.v1");
            let acquire = file
                .message_type
                .iter()
                .find(|m| m.name() == "AcquireRequest")
                .expect("AcquireRequest described");
            let request_id = acquire
                .field
                .iter()
                .find(|f| f.name() == "request_id")
                .unwrap();
            assert_eq!(
                request_id.number(),
                6,
                "field numbers are part of the contract"
            );
        }
    };
}

reflection_test!(reflection_v1, v1);
reflection_test!(reflection_v1alpha, v1alpha);
