{{/* Chart name. */}}
{{- define "kubetwin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name prefix of every object: the release name, with the chart name appended unless it is already in it, so
`helm install kubetwin` gives the same names as config/default (kustomize). Kept short enough for the suffixes.
*/}}
{{- define "kubetwin.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubetwin.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "kubetwin.labels" -}}
helm.sh/chart: {{ include "kubetwin.chart" . }}
{{ include "kubetwin.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetwin
{{- end }}

{{/* Labels that select the operator's pods. */}}
{{- define "kubetwin.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetwin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
control-plane: controller-manager
{{- end }}

{{- define "kubetwin.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-controller-manager" (include "kubetwin.fullname" .)) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator's own identity, exempted from its webhooks by a matchCondition. */}}
{{- define "kubetwin.serviceAccountUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "kubetwin.serviceAccountName" .) }}
{{- end }}

{{- define "kubetwin.webhookServiceName" -}}
{{- printf "%s-webhook-service" (include "kubetwin.fullname" .) }}
{{- end }}

{{- define "kubetwin.webhookConfigName" -}}
{{- printf "%s-admission" (include "kubetwin.fullname" .) }}
{{- end }}

{{/* Secret holding the webhook serving certificate (self-managed and cert-manager modes). */}}
{{- define "kubetwin.webhookSecretName" -}}
{{- if eq .Values.webhook.certificates.mode "provided" }}
{{- required "webhook.certificates.provided.secretName is required with mode provided" .Values.webhook.certificates.provided.secretName }}
{{- else }}
{{- printf "%s-webhook-server-cert" (include "kubetwin.fullname" .) }}
{{- end }}
{{- end }}

{{- define "kubetwin.certificateName" -}}
{{- printf "%s-serving-cert" (include "kubetwin.fullname" .) }}
{{- end }}

{{- define "kubetwin.issuerName" -}}
{{- printf "%s-selfsigned-issuer" (include "kubetwin.fullname" .) }}
{{- end }}

{{- define "kubetwin.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "kubetwin.externalBroker" -}}
{{- if .Values.broker.external.url }}true{{ end }}
{{- end }}

{{/* The embedded broker's TLS listener is on. */}}
{{- define "kubetwin.embeddedTLS" -}}
{{- if and (not .Values.broker.external.url) .Values.broker.embedded.tls.enabled }}true{{ end }}
{{- end }}

{{/*
The operator needs the hub's certificate: the embedded broker's TLS listener or the service API (also with an
external broker) serves it.
*/}}
{{- define "kubetwin.hubTLS" -}}
{{- if or (include "kubetwin.embeddedTLS" .) .Values.serviceAPI.enabled }}true{{ end }}
{{- end }}

{{/* The hub's certificate is your Secret's (broker.embedded.tls.secretName, --mqtt-tls-cert-file). */}}
{{- define "kubetwin.hubTLSProvided" -}}
{{- if and (include "kubetwin.hubTLS" .) .Values.broker.embedded.tls.secretName }}true{{ end }}
{{- end }}

{{/* The operator issues the hub's certificate (and publishes its CA in a ConfigMap). */}}
{{- define "kubetwin.hubTLSManaged" -}}
{{- if and (include "kubetwin.hubTLS" .) (not .Values.broker.embedded.tls.secretName) }}true{{ end }}
{{- end }}

{{/* The embedded broker's plain listener is on. */}}
{{- define "kubetwin.embeddedPlain" -}}
{{- if and (not .Values.broker.external.url) .Values.broker.embedded.plain.enabled }}true{{ end }}
{{- end }}

{{- define "kubetwin.mqttServiceName" -}}
{{- printf "%s-mqtt" (include "kubetwin.fullname" .) }}
{{- end }}

{{/* Secret holding the operator-issued MQTT CA and certificate (--mqtt-tls-secret-name). */}}
{{- define "kubetwin.mqttSecretName" -}}
{{- printf "%s-mqtt-server-cert" (include "kubetwin.fullname" .) }}
{{- end }}

{{/* ConfigMap where the operator publishes the MQTT CA for devices (--mqtt-tls-ca-configmap). */}}
{{- define "kubetwin.mqttCAConfigMapName" -}}
{{- printf "%s-mqtt-ca" (include "kubetwin.fullname" .) }}
{{- end }}

{{/*
The Service in front of the service API with an external broker (with the embedded broker, the MQTT Service
serves it on 443).
*/}}
{{- define "kubetwin.serviceAPIServiceName" -}}
{{- printf "%s-service-api" (include "kubetwin.fullname" .) }}
{{- end }}

{{/* The Service in front of the hub's TLS endpoints: the MQTT Service, or with an external broker the service API's. */}}
{{- define "kubetwin.hubServiceName" -}}
{{- if .Values.broker.external.url }}
{{- include "kubetwin.serviceAPIServiceName" . }}
{{- else }}
{{- include "kubetwin.mqttServiceName" . }}
{{- end }}
{{- end }}

{{/* DNS names of that Service, comma-separated (--mqtt-tls-host). */}}
{{- define "kubetwin.hubServiceHosts" -}}
{{- $svc := include "kubetwin.hubServiceName" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) | join "," }}
{{- end }}

{{/* Secret of the service API's shared access policies (--service-policies-secret), in the release namespace. */}}
{{- define "kubetwin.servicePoliciesSecretName" -}}
{{- printf "%s-service-policies" (include "kubetwin.fullname" .) }}
{{- end }}

{{/*
--service-hostname: serviceAPI.hostname, else the hub host name with the embedded broker (one host, MQTT on 8883 and
HTTPS on 443, as IoT Hub has), else the service API Service's DNS name.
*/}}
{{- define "kubetwin.serviceHostname" -}}
{{- if .Values.serviceAPI.hostname }}
{{- .Values.serviceAPI.hostname }}
{{- else if .Values.broker.external.url }}
{{- printf "%s.%s.svc" (include "kubetwin.serviceAPIServiceName" .) .Release.Namespace }}
{{- else }}
{{- include "kubetwin.hubHostname" . }}
{{- end }}
{{- end }}

{{/* --registry-namespace: serviceAPI.registryNamespace, else watchNamespace, else the release namespace. */}}
{{- define "kubetwin.registryNamespace" -}}
{{- .Values.serviceAPI.registryNamespace | default .Values.watchNamespace | default .Release.Namespace }}
{{- end }}

{{/* --hub-hostname: hubHostname, else the MQTT Service's DNS name, else (external broker) the broker URL's host. */}}
{{- define "kubetwin.hubHostname" -}}
{{- if .Values.hubHostname }}
{{- .Values.hubHostname }}
{{- else if .Values.broker.external.url }}
{{- (urlParse .Values.broker.external.url).hostname }}
{{- else }}
{{- printf "%s.%s.svc" (include "kubetwin.mqttServiceName" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/* Folder the webhook server reads tls.crt and tls.key from. */}}
{{- define "kubetwin.webhookCertDir" -}}
/tmp/k8s-webhook-server/serving-certs
{{- end }}

{{/*
The operator's rules on twins, their key Secrets and events: cluster-wide without watchNamespace (the ClusterRole),
else a Role in that namespace. The same rules as config/rbac/role.yaml's ClusterRole but for the webhook
configurations.
*/}}
{{- define "kubetwin.twinRules" }}
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Device key Secrets (<twin>-device-key) in the twins' namespaces, and the Secrets spec.authentication.secretRef
# names. RBAC cannot limit Secrets by label; the operator caches only those labelled kubetwin.io/device-keys=true.
# No delete: a key Secret goes with its twin (owner reference, garbage collector).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create", "get", "list", "update", "watch"]
# Twins and fleet configurations; create and delete for the service API's device registry and configurations
# REST. The configurations' content reaches twins by server-side apply (patch).
- apiGroups: ["kubetwin.io"]
  resources: ["devicetwins", "twinconfigurations"]
  verbs: ["create", "delete", "get", "list", "patch", "update", "watch"]
- apiGroups: ["kubetwin.io"]
  resources: ["devicetwins/finalizers", "twinconfigurations/finalizers"]
  verbs: ["update"]
- apiGroups: ["kubetwin.io"]
  resources: ["devicetwins/status", "twinconfigurations/status"]
  verbs: ["get", "patch", "update"]
{{- end }}

{{/*
Checks across values that the schema cannot express well; each fails with a message that says what to change.
*/}}
{{- define "kubetwin.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicas > 1 needs leaderElection.enabled=true: only one replica may bridge devices" }}
{{- end }}
{{- if and .Values.broker.external.url .Values.broker.embedded.tls.secretName (not .Values.serviceAPI.enabled) }}
{{- fail "broker.embedded.tls.secretName is for the embedded broker and the service API; with broker.external.url and serviceAPI.enabled=false nothing serves it (the broker's TLS is its own: use an ssl:// URL and broker.external.caSecret)" }}
{{- end }}
{{- if and .Values.serviceAPI.registryNamespace .Values.watchNamespace (ne .Values.serviceAPI.registryNamespace .Values.watchNamespace) }}
{{- fail "serviceAPI.registryNamespace must be watchNamespace (or empty): the operator would not see the DeviceTwins the device registry creates elsewhere" }}
{{- end }}
{{- if and .Values.broker.external.url .Values.broker.embedded.plain.enabled }}
{{- fail "broker.embedded.plain.enabled is for the embedded broker; with broker.external.url devices connect to that broker" }}
{{- end }}
{{- if not (or .Values.broker.external.url .Values.broker.embedded.tls.enabled .Values.broker.embedded.plain.enabled) }}
{{- fail "the embedded broker needs a listener: broker.embedded.tls.enabled=true (the default), broker.embedded.plain.enabled=true, or both" }}
{{- end }}
{{- if and .Values.webhook.enabled (eq .Values.webhook.certificates.mode "provided") (not .Values.webhook.certificates.provided.caBundle) }}
{{- fail "webhook.certificates.mode=provided needs webhook.certificates.provided.caBundle (base64 PEM of the CA that signed the Secret's certificate)" }}
{{- end }}
{{- end }}

{{/*
The query API's group: query.kubetwin.io for an operator of every namespace; with watchNamespace, that shard's own,
<watchNamespace>.query.kubetwin.io, so that the releases of several shards register an APIService each instead of
contending for one (kubectl twin query -n asks the namespace's own group first).
*/}}
{{- define "kubetwin.queryAPIGroup" -}}
{{- if .Values.watchNamespace }}{{ printf "%s.query.kubetwin.io" .Values.watchNamespace }}{{ else }}query.kubetwin.io{{ end }}
{{- end }}
