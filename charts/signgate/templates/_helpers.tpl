{{- define "signgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "signgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "signgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "signgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "signgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "signgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: admission-webhook
{{- end -}}

{{- define "signgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "signgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "signgate.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The API server's timeout for one call: the server's deadline plus a margin for the network
and TLS, so that the server answers (a denial, with a reason) before the API server gives up. */}}
{{- define "signgate.timeoutSeconds" -}}
{{- $timeout := add (ceil .Values.server.deadlineSeconds | int) (.Values.webhook.timeoutMarginSeconds | int) -}}
{{- if gt $timeout 30 -}}
{{- fail (printf "webhook timeoutSeconds would be %d (server.deadlineSeconds %v + webhook.timeoutMarginSeconds %v); the API server allows at most 30" $timeout .Values.server.deadlineSeconds .Values.webhook.timeoutMarginSeconds) -}}
{{- end -}}
{{- if le ($timeout | float64) (.Values.server.deadlineSeconds | float64) -}}
{{- fail "webhook.timeoutMarginSeconds must be at least 1: the server must answer before the API server gives up" -}}
{{- end -}}
{{- $timeout -}}
{{- end -}}

{{- define "signgate.serviceName" -}}
{{- include "signgate.fullname" . -}}
{{- end -}}

{{/* The names the API server (and Prometheus) reach the Service by; the serving certificate
covers each. */}}
{{- define "signgate.dnsNames" -}}
{{- $service := include "signgate.serviceName" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $service (printf "%s.%s" $service $ns) (printf "%s.%s.svc" $service $ns) (printf "%s.%s.svc.cluster.local" $service $ns) | toJson -}}
{{- end -}}

{{- define "signgate.tlsSecretName" -}}
{{- if eq .Values.tls.mode "existingSecret" -}}
{{- required "tls.existingSecret: name the kubernetes.io/tls Secret (tls.mode existingSecret)" .Values.tls.existingSecret -}}
{{- else -}}
{{- printf "%s-tls" (include "signgate.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "signgate.policyConfigMapName" -}}
{{- default (printf "%s-policy" (include "signgate.fullname" .)) .Values.policy.existingConfigMap -}}
{{- end -}}

{{/* Namespaces the webhook is never called for: its own (so that it can always start its own
pods, see README.md) and kube-system, by the label the API server sets on every namespace. */}}
{{- define "signgate.namespaceSelector" -}}
matchExpressions:
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values:
      {{- toYaml (uniq (concat (list .Release.Namespace "kube-system") .Values.webhook.excludeNamespaces)) | nindent 6 }}
{{- with .Values.webhook.optOutLabel }}
{{- if .key }}
  - key: {{ .key }}
    operator: NotIn
    values: [{{ required "webhook.optOutLabel.value: the value that opts a namespace out" .value | quote }}]
{{- end }}
{{- end }}
{{- end -}}

{{/* The workload kinds signgate reads images from, on CREATE and UPDATE. */}}
{{- define "signgate.rules" -}}
- apiGroups: [""]
  apiVersions: ["v1"]
  resources: ["pods", "pods/ephemeralcontainers", "replicationcontrollers"]
  operations: ["CREATE", "UPDATE"]
  scope: Namespaced
- apiGroups: ["apps"]
  apiVersions: ["v1"]
  resources: ["deployments", "replicasets", "statefulsets", "daemonsets"]
  operations: ["CREATE", "UPDATE"]
  scope: Namespaced
- apiGroups: ["batch"]
  apiVersions: ["v1"]
  resources: ["jobs", "cronjobs"]
  operations: ["CREATE", "UPDATE"]
  scope: Namespaced
{{- end -}}

{{- define "signgate.checks" -}}
{{- if not (has .Values.tls.mode (list "generate" "certManager" "existingSecret")) -}}
{{- fail (printf "tls.mode %q: use generate, certManager or existingSecret" .Values.tls.mode) -}}
{{- end -}}
{{- if not (has .Values.webhook.failurePolicy (list "Fail" "Ignore")) -}}
{{- fail (printf "webhook.failurePolicy %q: use Fail (or Ignore)" .Values.webhook.failurePolicy) -}}
{{- end -}}
{{- if and (not .Values.policy.existingConfigMap) (not .Values.policy.content) -}}
{{- fail "policy: set policy.content or policy.existingConfigMap" -}}
{{- end -}}
{{- $needed := add (.Values.preStopSleepSeconds | int) (include "signgate.timeoutSeconds" . | int) -}}
{{- if le (.Values.terminationGracePeriodSeconds | int) $needed -}}
{{- fail (printf "terminationGracePeriodSeconds %v must exceed preStopSleepSeconds + the webhook timeout (%d), or reviews in flight are cut off" .Values.terminationGracePeriodSeconds $needed) -}}
{{- end -}}
{{- end -}}
