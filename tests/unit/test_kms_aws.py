"""``awskms://`` references, key checks and error texts (pure: no KMS is contacted)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from botocore import exceptions as aws

from signgate.errors import KMSError
from signgate.keys.kms.aws import (
    AwsKeyReference,
    AwsKmsBackend,
    describe_failure,
    error_code,
    key_state_problem,
    parse_reference,
    signing_key_problem,
)
from signgate.keys.password import fixed_password

KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
MRK_ID = "mrk-1234abcd12ab34cd56ef1234567890ab"
KEY_ARN = f"arn:aws:kms:us-east-2:111122223333:key/{KEY_ID}"
ALIAS_ARN = "arn:aws:kms:eu-west-1:111122223333:alias/release/signing"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (f"/{KEY_ID}", AwsKeyReference("", KEY_ID, None, None)),
        (f"/{KEY_ID.upper()}", AwsKeyReference("", KEY_ID.upper(), None, None)),
        (f"/{MRK_ID}", AwsKeyReference("", MRK_ID, None, None)),
        (f"/{KEY_ARN}", AwsKeyReference("", KEY_ARN, "us-east-2", None)),
        (
            f"/arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/{KEY_ID}",
            AwsKeyReference(
                "", f"arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/{KEY_ID}",
                "us-gov-west-1", None,
            ),
        ),
        (
            f"/arn:aws-cn:kms:cn-north-1:111122223333:key/{MRK_ID}",
            AwsKeyReference(
                "", f"arn:aws-cn:kms:cn-north-1:111122223333:key/{MRK_ID}", "cn-north-1", None
            ),
        ),
        ("/alias/release", AwsKeyReference("", "alias/release", None, "alias/release")),
        (
            "/alias/team_a/release-2",
            AwsKeyReference("", "alias/team_a/release-2", None, "alias/team_a/release-2"),
        ),
        (f"/{ALIAS_ARN}", AwsKeyReference("", ALIAS_ARN, "eu-west-1", "alias/release/signing")),
        (
            "localhost:4566/alias/release",
            AwsKeyReference("localhost:4566", "alias/release", None, "alias/release"),
        ),
        (
            f"kms.us-east-2.amazonaws.com/{KEY_ARN}",
            AwsKeyReference("kms.us-east-2.amazonaws.com", KEY_ARN, "us-east-2", None),
        ),
        (f"127.0.0.1:8443/{KEY_ID}", AwsKeyReference("127.0.0.1:8443", KEY_ID, None, None)),
        (f"[::1]:4566/{KEY_ID}", AwsKeyReference("[::1]:4566", KEY_ID, None, None)),
    ],
)
def test_valid_references(location: str, expected: AwsKeyReference) -> None:
    parsed = parse_reference(location)
    assert parsed == expected
    assert str(parsed) == f"awskms://{location}"


def test_an_endpoint_in_the_reference_is_https_as_in_cosign() -> None:
    assert parse_reference("localhost:4566/alias/a").endpoint_url == "https://localhost:4566"
    assert parse_reference("/alias/a").endpoint_url is None


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("", "invalid awskms reference 'awskms://': no KEY after the endpoint"),
        ("alias", "invalid awskms reference 'awskms://alias': no KEY after the endpoint"),
        (
            "alias/release",
            "invalid awskms reference 'awskms://alias/release': an alias follows a third "
            "slash, as in awskms:///alias/NAME",
        ),
        ("/", "invalid awskms reference 'awskms:///': expected awskms://[ENDPOINT]/KEY"),
        ("/alias/", "'awskms:///alias/': expected"),
        ("/alias/two words", "'awskms:///alias/two words': expected"),
        ("/alias/x?region=us-east-1", "expected awskms://[ENDPOINT]/KEY"),
        ("/release", "'awskms:///release': expected awskms://[ENDPOINT]/KEY, KEY a key id"),
        ("/1234abcd-12ab-34cd-56ef-1234567890", "expected"),
        (f"/arn:aws:kms:us-east-2:1111:key/{KEY_ID}", "expected"),  # account is 12 digits
        (f"/arn:aws:s3:us-east-2:111122223333:key/{KEY_ID}", "expected"),
        ("/arn:aws:kms:us-east-2:111122223333:key/release", "expected"),
        (f"host/extra/{KEY_ID}", "expected"),
        (f"host name/{KEY_ID}", "ENDPOINT must be HOST[:PORT]"),
        (f"host:port/{KEY_ID}", "ENDPOINT must be HOST[:PORT]"),
        (f"https:/{KEY_ID}", "ENDPOINT must be HOST[:PORT]"),
    ],
)
def test_invalid_references(location: str, message: str) -> None:
    with pytest.raises(KMSError) as caught:
        parse_reference(location)
    assert message in caught.value.diagnostics()


def test_credentials_in_an_endpoint_are_refused_without_echoing_them() -> None:
    with pytest.raises(KMSError) as caught:
        parse_reference(f"{ACCESS_KEY_ID}:{SECRET}@kms.example.com/alias/release")
    text = caught.value.diagnostics()
    assert text == (
        "invalid awskms reference 'awskms://kms.example.com/alias/release': "
        "ENDPOINT must be HOST[:PORT]"
    )


SIGNING_KEY = {"KeyUsage": "SIGN_VERIFY", "SigningAlgorithms": ["ECDSA_SHA_256"]}


@pytest.mark.parametrize(
    ("response", "problem"),
    [
        # Real AWS sends both spec fields, moto only the deprecated one.
        ({**SIGNING_KEY, "KeySpec": "ECC_NIST_P256", "CustomerMasterKeySpec": "ECC_NIST_P256"},
         None),
        ({**SIGNING_KEY, "CustomerMasterKeySpec": "ECC_NIST_P256"}, None),
        (
            {"KeySpec": "RSA_2048", "KeyUsage": "SIGN_VERIFY"},
            "the key is RSA_2048 for SIGN_VERIFY; signgate needs ECC_NIST_P256 for SIGN_VERIFY",
        ),
        (
            {"KeySpec": "RSA_3072", "KeyUsage": "ENCRYPT_DECRYPT"},
            "the key is RSA_3072 for ENCRYPT_DECRYPT; signgate needs ECC_NIST_P256 for "
            "SIGN_VERIFY",
        ),
        (
            # moto's answer for a symmetric key: no KeyUsage at all.
            {"CustomerMasterKeySpec": "SYMMETRIC_DEFAULT", "SigningAlgorithms": []},
            "the key is SYMMETRIC_DEFAULT for ENCRYPT_DECRYPT; signgate needs ECC_NIST_P256 "
            "for SIGN_VERIFY",
        ),
        (
            {"KeySpec": "ECC_NIST_P256", "KeyUsage": "KEY_AGREEMENT"},
            "the key is ECC_NIST_P256 for KEY_AGREEMENT; signgate needs ECC_NIST_P256 for "
            "SIGN_VERIFY",
        ),
        (
            {"KeySpec": "ECC_NIST_P384", "KeyUsage": "SIGN_VERIFY"},
            "the key is ECC_NIST_P384 for SIGN_VERIFY; signgate needs ECC_NIST_P256 for "
            "SIGN_VERIFY",
        ),
    ],
)
def test_signing_key_problem(response: dict[str, Any], problem: str | None) -> None:
    assert signing_key_problem(response) == problem


def client_error(code: str, message: str = "", status: int = 400) -> aws.ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return aws.ClientError(response, "Sign")


MOTO_DENIED_XML = (
    '<?xml version="1.0" encoding="utf-8"?>\n<ErrorResponse><Errors><Error><Code>AccessDenied'
    "</Code><Message>User: arn:aws:iam::123456789012:user/signer is not authorized to perform:"
    " kms:Sign</Message><Type>Sender</Type></Error></Errors></ErrorResponse>"
)


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ({"KeyState": "Enabled", "Enabled": True}, None),
        ({"Enabled": True}, None),  # an older answer without KeyState
        ({"KeyState": "Disabled", "Enabled": False}, "the key is disabled"),
        ({"Enabled": False}, "the key is in state unknown, not Enabled"),
        ({"KeyState": "PendingDeletion"}, "the key is pending deletion"),
        ({"KeyState": "PendingReplicaDeletion"}, "the key is pending deletion"),
        (
            {"KeyState": "Unavailable"},
            "the key is unavailable (its custom key store is disconnected)",
        ),
        ({"KeyState": "PendingImport"}, "the key has no key material yet (PendingImport)"),
        ({"KeyState": "Updating"}, "the key is in state Updating, not Enabled"),
    ],
)
def test_key_state_problem(metadata: dict[str, Any], problem: str | None) -> None:
    assert key_state_problem(metadata) == problem


def test_error_code_reads_through_motos_xml_answers() -> None:
    assert error_code(client_error("NotFoundException").response) == "NotFoundException"
    assert error_code(client_error("403", MOTO_DENIED_XML, 403).response) == "AccessDenied"
    assert error_code(client_error("403", "Forbidden", 403).response) == "403"


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (client_error("NotFoundException", "Alias arn:... is not found."), "no such key or alias"),
        (
            client_error("AccessDeniedException", "User: x is not authorized"),
            "kms:Sign denied to these credentials (AccessDeniedException)",
        ),
        (
            client_error("403", MOTO_DENIED_XML, 403),
            "kms:Sign denied to these credentials (AccessDenied)",
        ),
        (
            client_error("UnrecognizedClientException", "The security token ... is invalid."),
            "the KMS refused the AWS credentials (UnrecognizedClientException); check "
            "AWS_PROFILE, AWS_ACCESS_KEY_ID or the role",
        ),
        (
            client_error("InvalidSignatureException", "Check your AWS Secret Access Key"),
            "the KMS refused the AWS credentials (InvalidSignatureException); check "
            "AWS_PROFILE, AWS_ACCESS_KEY_ID or the role",
        ),
        (
            client_error("ExpiredTokenException", "The security token included has expired"),
            "the KMS refused the AWS credentials (ExpiredTokenException); check AWS_PROFILE, "
            "AWS_ACCESS_KEY_ID or the role",
        ),
        (client_error("DisabledException", "arn:... is disabled."), "the key is disabled"),
        (
            client_error("UnsupportedOperationException", "not supported for this key"),
            "the key cannot do kms:Sign (UnsupportedOperationException); signgate needs "
            "ECC_NIST_P256 for SIGN_VERIFY",
        ),
        (
            client_error("InvalidKeyUsageException", "ENCRYPT_DECRYPT"),
            "the key cannot do kms:Sign (InvalidKeyUsageException); signgate needs "
            "ECC_NIST_P256 for SIGN_VERIFY",
        ),
        (
            client_error("KMSInvalidStateException", "arn:aws:kms:...:key/k is pending\ndeletion."),
            "kms:Sign failed: KMSInvalidStateException: arn:aws:kms:...:key/k is pending "
            "deletion.",
        ),
        (client_error("ThrottlingException"), "kms:Sign failed: ThrottlingException"),
        (
            aws.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/"),
            "cannot connect to the KMS",
        ),
        (
            aws.ConnectTimeoutError(endpoint_url="https://kms.example.com/"),
            "cannot connect to the KMS",
        ),
        (
            aws.ReadTimeoutError(endpoint_url="https://kms.example.com/"),
            "the KMS did not answer kms:Sign in time",
        ),
        (
            aws.SSLError(endpoint_url="https://kms.example.com/", error=OSError("self-signed")),
            "TLS verification of the KMS endpoint failed (AWS_CA_BUNDLE names a private CA)",
        ),
        (aws.NoRegionError(), "no AWS region: set AWS_REGION or name the key by its ARN"),
        (
            aws.NoCredentialsError(),
            "no AWS credentials found (environment, shared config and credentials files, SSO, "
            "container or instance role)",
        ),
        (
            aws.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
            "the AWS credentials could not be loaded (PartialCredentialsError)",
        ),
        (
            aws.CredentialRetrievalError(provider="custom-process", error_msg=SECRET),
            "the AWS credentials could not be loaded (CredentialRetrievalError)",
        ),
        (aws.ProfileNotFound(profile="ci"), "The config profile (ci) could not be found"),
    ],
)
def test_describe_failure(error: Exception, text: str) -> None:
    described = describe_failure(error, "Sign")
    assert described == text
    assert SECRET not in described
    assert ACCESS_KEY_ID not in described


def test_without_boto3_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes "import boto3" fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(KMSError) as caught:
        AwsKmsBackend().public_key("/alias/release", fixed_password(b""))
    assert caught.value.diagnostics() == (
        "awskms:// keys need the 'boto3' package: pip install 'signgate[aws]'"
    )
