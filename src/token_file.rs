//! `kiln token --token-file FILE ...`: token operations directly on a token
//! file, to bootstrap the first admin token before any server can be asked.
//! Whoever can write the file is trusted with it; running servers pick the
//! change up within two reload intervals.

use std::path::Path;

use anyhow::Result;
use kiln_auth::admin::info;
use kiln_auth::tokens::TokenStore;
use kiln_proto::access::Permissions;
use kiln_proto::kiln::admin::CreateTokenResponse;
use kiln_tools::token::{describe, parse_duration};

use crate::{TokenCommand, print_created};

pub(crate) fn run(path: &Path, command: TokenCommand) -> Result<()> {
    let store = TokenStore::open(path)?;
    match command {
        TokenCommand::Create { principal, tenant, permissions, expires } => {
            let ttl = parse_duration(&expires)?;
            let (token, record) =
                store.create(&principal, &tenant, Permissions::parse(&permissions)?, ttl)?;
            print_created(&CreateTokenResponse { token, info: Some(info(&record)) });
        }
        TokenCommand::List => {
            for record in store.list() {
                println!("{}", describe(&info(&record)));
            }
        }
        TokenCommand::Rotate { id } => {
            let (token, record) = store.rotate(&id)?;
            print_created(&CreateTokenResponse { token, info: Some(info(&record)) });
        }
        TokenCommand::Revoke { id } => println!("{}", describe(&info(&store.revoke(&id)?))),
    }
    Ok(())
}
