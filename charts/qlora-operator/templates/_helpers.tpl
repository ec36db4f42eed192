{{/* Name of the chart, or nameOverride. */}}
{{- define "qlora-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object's name: fullnameOverride, or "<release>-<name>" (just the release when it contains the name). */}}
{{- define "qlora-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "qlora-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "qlora-operator.labels" -}}
helm.sh/chart: {{ include "qlora-operator.chart" . }}
{{ include "qlora-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: qlora-operator
{{- end }}

{{/* Labels that select the operator's pod; never change them in an upgrade (Deployment selectors are immutable). */}}
{{- define "qlora-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qlora-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "qlora-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qlora-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "qlora-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The operator's permissions: exactly the API calls it makes (operator/qlora_operator/kube.py and kopf's watches),
no wildcards. tests/cluster/test_helm.py runs the operator under them, records every request it sends and checks
that each verb of each rule was used and none was refused. kopf runs with peering off and cluster scanning
disabled, so it needs no kopfpeerings, CRDs or namespaces. Rendered into the ClusterRole, or into a Role per
watched namespace.
*/}}
{{- define "qlora-operator.rules" -}}
# The custom resource: kopf lists and watches it, and patches its own annotations (qlora.io/*) on it.
- apiGroups: [qlora.io]
  resources: [qlorafinetunes]
  verbs: [list, watch, patch]
# Status is written through its subresource.
- apiGroups: [qlora.io]
  resources: [qlorafinetunes/status]
  verbs: [patch]
# The children's ownerReferences block the run's deletion until they are gone (blockOwnerDeletion); where the
# OwnerReferencesPermissionEnforcement admission plugin runs (OpenShift), that takes update on its finalizers.
- apiGroups: [qlora.io]
  resources: [qlorafinetunes/finalizers]
  verbs: [update]
# The trainer's Job: looked up and created per run, listed and watched for state, patched for
# suspend, deadline and TTL.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch]
# The Job's pods: listed and watched for phase, scheduling, exit reasons and the pod IP of the metrics.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# The trainer config (created per run; read and patched when adopting one left by an interrupted create) and
# the ConfigMap of spec.dataset.configMap (checked to have its key).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
# The headless Service of a multi-node run (read when adopting one that exists).
- apiGroups: [""]
  resources: [services]
  verbs: [get, create]
# spec.model.pvc, spec.dataset.pvc and spec.output.pvc are checked to exist.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
# Events on each QLoRAFinetune: its transitions, and kopf's warnings; and the Job controller's FailedCreate
# Events of a Job that has no pod (a quota, a policy or a webhook refuses it), listed by field selector.
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
{{- end }}

{{/* The operator's settings (operator/qlora_operator settings read from QLORA_* variables). */}}
{{- define "qlora-operator.env" -}}
- name: QLORA_WATCH_NAMESPACES
  value: {{ join "," .Values.watchNamespaces | quote }}
- name: QLORA_TRAINER_IMAGE
  value: {{ .Values.trainer.image | quote }}
- name: QLORA_DEFAULT_BASE_MODEL
  value: {{ .Values.defaults.baseModel | quote }}
- name: QLORA_PROMETHEUS_URL
  value: {{ .Values.prometheus.url | quote }}
- name: QLORA_SCRAPE_INTERVAL
  value: {{ .Values.metrics.scrapeInterval | quote }}
- name: QLORA_STATUS_MIN_INTERVAL
  value: {{ .Values.status.minInterval | quote }}
- name: QLORA_METRICS_PORT
  value: {{ .Values.metrics.port | quote }}
- name: QLORA_HEALTH_PORT
  value: {{ .Values.health.port | quote }}
- name: QLORA_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: QLORA_LEADER_LEASE
  value: {{ printf "%s/%s" .Release.Namespace (include "qlora-operator.fullname" .) | quote }}
{{- end }}
